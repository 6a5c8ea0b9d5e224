import json
import os
import re

import pytest
import yaml

from polyfast.cli import main
from polyfast.config import SFTConfig, flatten, load_config
from polyfast.errors import ConfigError
from polyfast.pipeline import DEMO_SFT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_config_file_matches_the_builtin_demo():
    from_file = load_config(SFTConfig, os.path.join(ROOT, "configs", "demo_sft.yaml"))
    builtin = load_config(SFTConfig, None, [], extra=flatten(DEMO_SFT))
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


def test_data_stats_on_the_polyalign_layout(capsys):
    from conftest import POLYALIGN_FORMAT
    assert main(["data", "stats", str(POLYALIGN_FORMAT), "--legacy-tokens"]) == 0
    out = capsys.readouterr().out
    # 44 records in 9 buckets: the 9 records of en|single|qa|short weigh 44 / (9 * 9)
    assert "en|single|qa|short" in out and "0.5432" in out and "44 records in 9 buckets" in out
    assert "2 empty responses" in out


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


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path, capsys):
    # the pipeline shrunk (a quarter epoch of SFT, short generations, 12 HDPO steps); the full one
    # is the README's command
    from polyfast.pipeline import run_demo
    summary = run_demo(str(tmp_path), ["train.epochs=0.25"], progress=False, per_bucket=3,
                       max_new_tokens=48, hdpo_overrides=["train.max_steps=12"])
    out = capsys.readouterr().out
    first = out.split("SFT vs HDPO")[0]  # the SFT before/after table
    rows = [re.match(r"^\| (\S+) +\| +([\d.]+) \| +([\d.]+) \|", line) for line in first.splitlines()]
    sft_table = {m[1]: (float(m[2]), float(m[3])) for m in rows if m}
    assert len(sft_table) >= 17
    assert all(after < before for before, after in sft_table.values()), sft_table
    assert "SFT vs HDPO" in out and "held-out pairs" in out
    for name in ("sft/final/config.json", "hdpo/final/config.json", "pairs.jsonl", "references.json",
                 "test_predictions_hdpo.jsonl", "demo_summary.json", "report.md", "metrics.json",
                 "bng_hcr.png", "lengths_sft.png", "lengths_hdpo.png"):
        assert os.path.exists(tmp_path / name), name
    from polyfast.data import demo_records
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert {(r["title"], r["profile"]) for r in runs} == {("SFT", "oracle"), ("SFT", "prior"),
                                                         ("HDPO", "oracle"), ("HDPO", "prior")}
    assert all(set(r["buckets"]) == {x.bucket_id for x in demo_records("test")} for r in runs)
    assert "Evaluation report" in out and "HDPO (prior)" in out
    # report.md says what happened: verdicts per profile, the training tables, held-out accuracy
    report = (tmp_path / "report.md").read_text()
    for profile in ("oracle", "prior"):
        assert f"## Verdict: HDPO vs SFT (profile {profile})" in report
    assert re.search(r"band distance to the human support \(lower is better\): HDPO moved \d+ "
                     r"of \d+ buckets toward the human side", report)
    assert "## Training" in report and "held-out pairs: reward accuracy" in report
    from polyfast.eval.generate import predictions_profile
    assert predictions_profile(str(tmp_path / "test_predictions_hdpo.jsonl")) == "oracle"
    assert "| loss SFT" in report and "| macro" in report
    assert summary["hdpo_tokens_per_s"] > 0 and summary["pairs"]["kept"] > 0


def test_generate_pairs_critic_and_hdpo_commands(tmp_path, capsys):
    from polyfast.data import load_pairs
    sft = tmp_path / "sft"
    assert main(["sft", os.path.join(ROOT, "configs", "demo_sft.yaml"), f"run_dir={sft}",
                 "train.max_steps=3", "train.progress=false", "data.val=null",
                 "model.tiny.hidden_size=32", "model.tiny.num_layers=1",
                 "model.tiny.intermediate_size=64"]) == 0
    preds = tmp_path / "preds.jsonl"
    assert main(["generate", "--model", str(sft), "--data", "demo:train", "--out", str(preds),
                 "--limit", "12", "--max-new-tokens", "16", "--batch-size", "5"]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 12 and all(r["id"].startswith("demo-") and "|" in r["bucket_id"] for r in rows)
    # several sampled responses per prompt
    samples = tmp_path / "samples.jsonl"
    assert main(["generate", "--model", str(sft), "--data", "demo:train", "--out", str(samples),
                 "--limit", "3", "--max-new-tokens", "8", "--sample", "--num-samples", "3"]) == 0
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["predictions"]) == 3 == len(r["new_tokens"]) for r in rows)
    assert all(r["prediction"] == r["predictions"][0] for r in rows)
    assert main(["generate", "--model", str(sft), "--data", "demo:train", "--out", str(samples),
                 "--limit", "3", "--num-samples", "3"]) == 2
    assert "need sampling (--sample)" in capsys.readouterr().err
    # an SFT model of 3 steps says little: pair the records with hand-made predictions instead,
    # three per record (the third repeats the first)
    from polyfast.data import demo_records
    chosen = demo_records("train")[::80]
    preds.write_text("\n".join(json.dumps({"id": r.id, "prediction": r.response[::-1],
                                           "predictions": [r.response[::-1], r.response.upper() + "!",
                                                           r.response[::-1] + " "]})
                                for r in chosen))
    refs = tmp_path / "refs.json"
    assert main(["critic", "references", "--data", "demo:train", "--out", str(refs)]) == 0
    pairs = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--records", "demo:train", "--predictions", str(preds), "--out", str(pairs),
                 "--references", str(refs), "--num-samples", "3"]) == 0
    out = capsys.readouterr().out
    assert "dropped_no_prediction" in out  # the records without a prediction are counted
    assert f"dropped_duplicate_sample {len(chosen)}" in out
    loaded = load_pairs(pairs)
    assert len(loaded) == 2 * len(chosen) and all(p.rejected_dist is not None for p in loaded)
    scores = tmp_path / "scores.jsonl"
    assert main(["critic", "score", "--pairs", str(pairs), "--references", str(refs),
                 "--out", str(scores)]) == 0
    assert len(scores.read_text().splitlines()) == 2 * len(loaded)
    critic = tmp_path / "critic"
    assert main(["critic", "train", "--data", "demo:train", "--pairs", str(pairs), "--references",
                 str(refs), "--out", str(critic), "--epochs", "1"]) == 0
    assert (critic / "critic.safetensors").exists()
    cfg = tmp_path / "hdpo.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "hdpo"),
                                   "model": {"path": str(sft / "final")},
                                   "data": {"pairs": str(pairs), "max_tokens": 4096},
                                   "hdpo": {"distance": "pairs"},
                                   "train": {"max_steps": 2, "progress": False}}))
    assert main(["hdpo", str(cfg)]) == 0
    assert (tmp_path / "hdpo" / "final" / "model.safetensors").exists()
    metrics = (tmp_path / "hdpo" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in metrics]
    (data_row,) = [r for r in rows if r.get("event") == "data"]
    # the two pairs of a record share its prompt: one group per prompt (records may share one)
    assert data_row["counts"]["kept"] == 2 * len(chosen)
    assert data_row["counts"]["groups"] <= len(chosen)
    assert data_row["pair_tokens_per_epoch"] > data_row["tokens_per_epoch"]


def test_every_shipped_config_loads():
    from polyfast.config import HDPOConfig
    for name, cls in (("demo_sft.yaml", SFTConfig), ("demo_hdpo.yaml", HDPOConfig)):
        cfg = load_config(cls, os.path.join(ROOT, "configs", name))
        assert cfg.run_dir.startswith("runs/demo")
