import os
import re

import pytest
import yaml

from polyfast.cli import DEMO_SFT, _flatten, main
from polyfast.config import SFTConfig, load_config
from polyfast.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_config_file_matches_the_builtin_demo():
    from_file = load_config(SFTConfig, os.path.join(ROOT, "configs", "demo_sft.yaml"))
    builtin = load_config(SFTConfig, None, [], extra=_flatten(DEMO_SFT))
    assert from_file == builtin


@pytest.mark.parametrize("override,key", [
    ("train.lr=fast", "train.lr"), ("data.packing=zip", "data.packing"),
    ("train.nope=1", "train.nope"), ("model.tiny.arch=gpt9", "model.tiny.arch"),
    ("train.betas=[0.9]", "train.betas"), ("data.max_tokens=1.5", "data.max_tokens")])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, [override])
    assert e.value.key == key and f"'{key}'" in str(e.value)


def test_config_file_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"data": {"packin": "bucket"}}))
    with pytest.raises(ConfigError, match="data.packin"):
        load_config(SFTConfig, p)


def test_overrides_parse_yaml_values():
    cfg = load_config(SFTConfig, None, ["train.lr=3e-4", "train.max_steps=7", "data.weight_clip=null",
                                        "train.betas=[0.9, 0.99]"])
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.train.betas == (0.9, 0.99)


def test_data_stats_on_the_authors_sample(sample_dir, capsys):
    assert main(["data", "stats", str(sample_dir / "dist_sft_val.json"), "--legacy-tokens"]) == 0
    out = capsys.readouterr().out
    assert "en|multi|qa|medium" in out and "38.4615" in out and "2000 records in 13 buckets" in out
    assert "40 empty responses" in out


def test_cli_reports_data_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"response": "ok"}\n{"oops": 1}\n')
    assert main(["data", "stats", str(bad)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err


def test_sft_command_runs(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["sft", os.path.join(ROOT, "configs", "demo_sft.yaml"), f"run_dir={run}",
                 "train.max_steps=2", "train.progress=false", "model.tiny.hidden_size=32",
                 "model.tiny.num_layers=1", "model.tiny.intermediate_size=64"])
    assert code == 0
    out = capsys.readouterr().out
    assert "macro" in out and os.path.exists(run / "final" / "model.safetensors")
    assert os.path.exists(run / "metrics.jsonl") and os.path.exists(run / "config.yaml")


def test_demo_command_trains_every_bucket_down(tmp_path, capsys):
    # a short demo (a quarter epoch): the full one is the README's command
    assert main(["demo", "--out", str(tmp_path), "train.epochs=0.25", "train.progress=false"]) == 0
    out = capsys.readouterr().out
    rows = [re.match(r"^\| (\S+) +\| +([\d.]+) \| +([\d.]+) \|", line) for line in out.splitlines()]
    table = {m[1]: (float(m[2]), float(m[3])) for m in rows if m}
    assert len(table) >= 17  # 20 demo buckets + macro
    assert all(after < before for before, after in table.values()), table
    assert os.path.exists(tmp_path / "sft" / "final" / "config.json")
