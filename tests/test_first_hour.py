"""What a new user meets first: the CLI's speed and messages, the data summary, Ctrl-C and resume,
Hugging Face datasets inputs, TensorBoard, evaluation that empty answers cannot game, the report's
verdicts, and the module layout."""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from polyfast.cli import main
from polyfast.data import demo_records, load_records, make_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                           "intermediate_size": 64}},
        "data": {"train": "demo", "val": "demo", "max_tokens": 512},
        "train": {"lr": 1e-3, "log_every": 1, "progress": False, "max_steps": 6}}


def _config(tmp_path, run_dir, **train):
    cfg = json.loads(json.dumps(TINY))
    cfg["run_dir"] = str(run_dir)
    cfg["train"].update(train)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, check=False, cwd=ROOT)


# -- 9. fast answers, config show ---------------------------------------------------------------

def test_cli_import_help_and_config_typos_need_no_torch():
    # fast answers: importing the CLI, --help and a config typo never import torch or transformers
    # (what would cost seconds); checked by what is imported, not by a clock
    code = """if True:
        import contextlib, io, sys
        import polyfast.cli
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "imported"
        for argv in (["sft", "configs/demo_sft.yaml", "train.lrr=1"],
                     ["hdpo", "configs/demo_hdpo.yaml", "hdpo.bta=1"]):
            assert polyfast.cli.main(argv) == 2
        assert "torch" not in sys.modules, "a config typo imported torch"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                polyfast.cli.main(["sft", "--help"])
            except SystemExit as e:
                assert e.code == 0, e.code
        assert "--overwrite" in out.getvalue(), out.getvalue()
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "--help imported"
        print("ok")
        """
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert "did you mean 'lr'?" in res.stderr and "did you mean 'beta'?" in res.stderr
    res = subprocess.run([sys.executable, "-m", "polyfast", "sft", "--help"], capture_output=True,
                         text=True, timeout=60, check=False, cwd=ROOT)
    assert res.returncode == 0 and "--overwrite" in res.stdout


@pytest.mark.parametrize("kind", ["sft", "hdpo"])
def test_config_show_lists_every_key_with_its_meaning_and_loads_back(kind, tmp_path, capsys):
    import dataclasses

    from polyfast.config import CONFIGS, load_config

    assert main(["config", "show", kind]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "shown.yaml"
    path.write_text(text)
    assert load_config(CONFIGS[kind], path) == CONFIGS[kind]()

    def keys(obj, indent=""):
        for f in dataclasses.fields(obj):
            yield indent, f.name
            if dataclasses.is_dataclass(getattr(obj, f.name)):
                yield from keys(getattr(obj, f.name), indent + "  ")
    lines = text.splitlines()
    for indent, name in keys(CONFIGS[kind]()):
        line = next(x for x in lines if x.startswith(f"{indent}{name}:"))
        assert "  # " in line and len(line.split("  # ", 1)[1]) > 5, line
    # a file with overrides, or overrides alone, shown as loaded
    assert main(["config", "show", kind, str(path), "seed=7"]) == 0
    assert "seed: 7" in capsys.readouterr().out
    assert main(["config", "show", kind, "seed=8", "train.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "seed: 8" in out and "  lr: 0.5 " in out
    assert main(["config", "show", kind, "train.lrr=1"]) == 2
    assert "did you mean 'lr'?" in capsys.readouterr().err


# -- 12. layout ---------------------------------------------------------------------------------

def _imports(module: str) -> set[str]:
    tree = ast.parse(open(os.path.join(ROOT, "polyfast", f"{module}.py")).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module or "")
    return out


def test_the_cli_is_the_top_floor():
    assert "cli" not in _imports("pipeline")  # the demo's settings live below the CLI
    assert not {m for m in _imports("cli") if m.split(".")[0] not in ("errors", "config")} - {
        "pipeline", "train.sft", "train.hdpo", "train.rundir", "eval.generate", "eval.evaluate",
        "critic", "data", "data.pairs", "model", "tables"}


# -- 6. pairs --references with nothing kept ----------------------------------------------------

def test_pairs_with_references_and_no_pair_kept_is_a_clear_error(tmp_path, capsys):
    from polyfast.critic import text_references

    recs = demo_records("train")[:4]
    preds = tmp_path / "p.jsonl"  # every prediction equals its human answer: no pair survives
    preds.write_text("".join(json.dumps({"id": r.id, "prediction": r.response}) + "\n"
                             for r in recs))
    text_references(demo_records("train")).save(str(tmp_path / "refs.json"))
    args = ["pairs", "--records", "demo", "--predictions", str(preds), "--out",
            str(tmp_path / "pairs.jsonl")]
    for extra in ([], ["--references", str(tmp_path / "refs.json")]):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert "no pair kept" in err and "dropped_equal 4" in err
    assert not (tmp_path / "pairs.jsonl").exists()


# -- 7 and 8. the data summary, the demo's inputs, Ctrl-C and resume ----------------------------

def test_data_summary_ctrl_c_and_resume(tmp_path, capsys, monkeypatch):
    from polyfast.train.sft import SFTTrainer

    run = tmp_path / "run"
    cfg = _config(tmp_path, run, save_every=2)
    real = SFTTrainer.train_step

    def ctrl_c_in_step_4(self, packs):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, packs)
    monkeypatch.setattr(SFTTrainer, "train_step", ctrl_c_in_step_4)
    assert main(["sft", cfg]) == 130
    out, err = capsys.readouterr()
    # what the data became, on the console when training starts (512-token packs drop and cut)
    summary = next(line for line in out.splitlines() if line.startswith("sft data: train: "))
    assert "examples kept" in summary and "dropped (longer than 512 tokens)" in summary
    assert "prompts cut from the left" in summary and "val: " in summary
    assert "note: this config uses the demo's inputs: data.train=demo" in err
    # one line, no traceback: the step, the last checkpoint, the command that resumes
    lines = [x for x in err.splitlines() if x.startswith("polyfast:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "interrupted at step 3 of 6" in lines[0] and "step_000002" in lines[0]
    resume = lines[0].split("resume with: ")[1]
    assert resume == f"polyfast sft {cfg} train.resume=true"

    monkeypatch.setattr(SFTTrainer, "train_step", real)
    assert main(resume.split()[1:]) == 0
    out = capsys.readouterr().out
    assert "sft: resumed from step 2 of 6" in out
    assert "4 steps (3-6, resumed from step 2)" in out
    table = out.split("Eval loss per bucket")[1].split("\n\n")[0]
    assert "| macro" in table and "nan" not in table  # before-training rows from the run's log


def test_a_config_of_demo_files_says_so(capsys):
    from polyfast.cli import note_demo_inputs
    from polyfast.config import HDPOConfig, load_config

    path = os.path.join(ROOT, "configs", "demo_hdpo.yaml")
    note_demo_inputs(load_config(HDPOConfig, path))  # what `polyfast hdpo` says before training
    assert ("this config uses the demo's inputs: model.path=runs/demo/sft/final, "
            "data.pairs=runs/demo/pairs.jsonl (override them, e.g. model.path=PATH, for your own)"
            ) in capsys.readouterr().err
    note_demo_inputs(load_config(HDPOConfig, path, ["data.pairs=mine.jsonl", "model.path=sft"]))
    assert capsys.readouterr().err == ""


# -- 10. Hugging Face datasets --------------------------------------------------------------------

def test_records_and_pairs_from_datasets_forms(tmp_path):
    import datasets
    from conftest import POLYALIGN_FORMAT

    from polyfast.data import load_pairs

    rows = json.loads(POLYALIGN_FORMAT.read_text())
    for r in rows:
        r.setdefault("history", [])  # one schema for every row
    (tmp_path / "r.json").write_text(json.dumps(rows))
    want = load_records(tmp_path / "r.json", legacy_tokens=True)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "r.parquet"))
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3)),
                          "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    arrow = next(p for p in os.listdir(tmp_path / "ds") if p.endswith(".arrow"))
    for path in ("r.parquet", "ds", os.path.join("ds", arrow)):
        assert load_records(tmp_path / path, legacy_tokens=True) == want, path
    test = load_records(tmp_path / "dd", split="test", legacy_tokens=True)
    assert [r.id for r in test] == [r.id for r in want[:5]]  # content ids survive the slice
    assert len(load_records(tmp_path / "dd", split="val")) == 3  # the val role: "validation"
    with pytest.raises(Exception, match="splits train, validation, test and none for"):
        load_records(tmp_path / "dd")
    # a bad row in a Parquet file is named by its row number, as in JSONL
    rows[3]["dist_sft_weight"] = -1.0
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(Exception, match=r"bad.parquet:4: 'dist_sft_weight' must be >= 0"):
        load_records(tmp_path / "bad.parquet")
    # pairs read the same way
    pairs = [{"id": f"p{i}", "bucket_id": "en|single|assistant|short", "prompt": f"Q{i}?", "chosen": "Yes.",
              "rejected": "No, never."} for i in range(3)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    datasets.Dataset.from_list(pairs).to_parquet(str(tmp_path / "pairs.parquet"))
    assert load_pairs(tmp_path / "pairs.parquet") == load_pairs(tmp_path / "pairs.jsonl")


def test_hub_datasets_offline_is_a_clear_error(monkeypatch):
    import datasets
    asked = {}

    def offline(name, split):
        asked.update(name=name, split=split)
        raise ConnectionError("Couldn't reach the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(Exception, match=r"hf:someone/data:dev: cannot load the Hub dataset "
                                        r"'someone/data' split 'dev' \(offline"):
        load_records("hf:someone/data:dev")
    assert asked == {"name": "someone/data", "split": "dev"}
    # without a split: the DatasetDict, from which the data role picks its split
    ds = datasets.Dataset.from_list([{"instruction": "Q?", "output": "A."}])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: asked.update(split=split)
                        or datasets.DatasetDict({"train": ds, "validation": ds, "test": ds}))
    assert [r.response for r in load_records("hf:someone/data", split="val")] == ["A."]
    assert asked["split"] is None


# -- 11. TensorBoard ------------------------------------------------------------------------------

def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the optional tensorboard extra: "
                                              "pip install polyfast[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["sft", _config(tmp_path, run, report_to=["tensorboard"])]) == 0
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    rows = [json.loads(x) for x in open(run / "metrics.jsonl")]
    train = [r for r in rows if r["event"] == "train"]
    got = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert got == pytest.approx({r["step"]: r["loss"] for r in train}, rel=1e-6)
    bucket = next(iter(train[-1]["bucket_loss"]))
    assert acc.Scalars(f"train/bucket_loss/{bucket}")[-1].value == pytest.approx(
        train[-1]["bucket_loss"][bucket], rel=1e-6)
    assert {"train/lr", "train/tokens_per_s", "eval/macro"} <= set(acc.Tags()["scalars"])


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert main(["sft", _config(tmp_path, tmp_path / "run", report_to=["tensorboard"])]) == 2
    assert "train.report_to': tensorboard is not installed" in capsys.readouterr().err


# -- 4. metrics that empty answers cannot game; the band floor; per-feature in-band ---------------

def test_empty_generations_are_reported_and_empty_gold_answers_left_out():
    from polyfast.eval.evaluate import evaluate

    train = [make_record(id=f"t{i}", response="" if i % 4 == 0 else f"Paris is big {i}.",
                         family="qa", split="train") for i in range(24)]
    test = [make_record(id=f"x{i}", response="" if i < 2 else "Paris.", family="qa")
            for i in range(8)]
    res = evaluate(test, ["   "] * 8, train)["buckets"]["en|single|qa|short"]
    assert res["empty"] == 1.0 and res["human_empty"] == pytest.approx(6 / 24)
    assert res["empty_references"] == 2
    assert res["exact_match"] == 0.0 and res["f1"] == 0.0  # the two empty golds no longer count
    good = evaluate(test, [r.response for r in test], train)["buckets"]["en|single|qa|short"]
    assert good["exact_match"] == 1.0 and good["empty"] == pytest.approx(2 / 8)


def test_band_floor_keeps_constant_features_on_the_language_scale():
    from polyfast.critic import FEATURE_NAMES, feature_matrix, text_references

    train = ([make_record(id=f"a{i}", response=f"The answer is number {i}", family="qa",
                          split="train") for i in range(25)]
             + [make_record(id=f"b{i}", response=f"Is it {i}? Maybe! Who knows?", family="dialogue",
                            split="train") for i in range(25)])
    q = FEATURE_NAMES.index("questions")
    text = "The answer is 7?"  # one question mark: never seen among the qa humans
    ours = text_references(train).distance(feature_matrix([text]), ["en|single|qa|short"])[0]
    authors = text_references(train, band_floor="authors").distance(
        feature_matrix([text]), ["en|single|qa|short"])[0]
    assert authors > 1e4  # 1 / 1e-6 over 34 features
    assert ours < 1.0
    refs = text_references(train)
    en = refs.stats["en"]
    spread = max(en["q90"][q] - en["q10"][q], en["std"][q])
    assert refs.scale("en|single|qa|short")[q] == pytest.approx(spread)


def test_in_band_share_informs_where_hcr_is_zero():
    from polyfast.eval import metrics as M

    q10, q90 = np.zeros(3), np.ones(3)
    gen = np.array([[0.5, 0.5, 2.0], [0.5, 2.0, 0.5], [2.0, 0.5, 0.5]])  # each row misses one
    assert M.hcr(gen, q10, q90) == 0.0
    assert M.in_band_by_feature(gen, q10, q90) == pytest.approx([2 / 3] * 3)
    assert M.in_band(gen, q10, q90) == pytest.approx(2 / 3)


# -- 5. evaluation on real data: truncation, ids, --limit, the stored profile ---------------------

@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """A tiny exported model with a 96-token context."""
    from polyfast.config import ModelConfig, TinyModelConfig
    from polyfast.data import byte_tokenizer
    from polyfast.model import load_model

    tok = byte_tokenizer()
    model = load_model(ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                        num_kv_heads=1, intermediate_size=64,
                                                        max_position_embeddings=96)),
                       tok, packed=False)
    out = tmp_path_factory.mktemp("ctx96")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_generate_cuts_long_prompts_from_the_left_and_stores_the_profile(short_context_model,
                                                                         tmp_path, capsys):
    import warnings

    from polyfast.eval.generate import load_predictions, predictions_profile

    out = tmp_path / "p.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no transformers warning about the context length
        assert main(["generate", "--model", short_context_model, "--data", "demo:test",
                     "--out", str(out), "--max-new-tokens", "8", "--limit", "6"]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    cut = [r for r in rows if r["prompt_truncated"]]
    assert cut and all(r["prompt_tokens"] == 96 - 8 for r in cut)
    assert f"{len(cut)} prompts longer than the model's context" in printed
    assert predictions_profile(str(out)) == "oracle"  # --system profile: the gold length bin
    # eval reports the stored profile, refuses another, and --limit takes a subset
    assert main(["eval", "--predictions", str(out), "--data", "demo:test", "--references",
                 "demo:train", "--out", str(tmp_path / "e"), "--profile", "prior"]) == 2
    assert "generated with the 'oracle' profile" in capsys.readouterr().err
    test = demo_records("test")[:6]
    (tmp_path / "six.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in test))
    assert main(["eval", "--predictions", str(out), "--data", str(tmp_path / "six.jsonl"),
                 "--references", "demo:train", "--out", str(tmp_path / "e"), "--limit", "3"]) == 0
    res = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert res["profile"] == "oracle" and res["n"] == 3
    assert len(load_predictions(str(out))) == 6


def test_stratified_subset_keeps_every_bucket_in_proportion():
    from collections import Counter

    from polyfast.eval.evaluate import stratified_subset

    test = demo_records("test")
    sub = stratified_subset(test, 40, seed=3)
    assert len(sub) == 40 and sub == stratified_subset(test, 40, seed=3)
    assert {r.bucket_id for r in sub} == {r.bucket_id for r in test}
    full, part = Counter(r.bucket_id for r in test), Counter(r.bucket_id for r in sub)
    assert all(abs(part[b] - 40 * n / len(test)) <= 1.5 for b, n in full.items())
    assert [r.id for r in sub] == [r.id for r in test if r in sub]  # in the records' order


# -- 3. the report's verdicts ---------------------------------------------------------------------

def test_report_verdicts_count_buckets_moved_toward_the_humans():
    from polyfast.eval.report import report_markdown, verdicts

    def run(title, dist, hcr):
        buckets = {b: {"n": 5, "distance": d, "hcr": h, "bng_features_left_out": 0}
                   for b, d, h in zip("abc", dist, hcr)}
        return {"title": title, "profile": "oracle", "buckets": buckets,
                "macro": {"distance": float(np.mean(dist)), "hcr": float(np.mean(hcr))},
                "weighted": {}}
    sft, hdpo = run("SFT", [1.0, 2.0, 3.0], [0.1, 0.2, 0.3]), run("HDPO", [0.5, 1.5, 3.5], [0.1, 0.2, 0.3])
    lines = verdicts(sft, hdpo)
    assert lines[0] == ("- band distance to the human support (lower is better): HDPO moved 2 of 3 "
                        "buckets toward the human side, 1 away, 0 unchanged; median change "
                        "-0.5000; macro 2.0000 -> 1.8333 (-0.1667, better).")
    assert "HDPO moved 0 of 3 buckets toward the human side, 0 away, 3 unchanged" in lines[1]
    text = report_markdown([sft, hdpo], ["## Training", "", "a table"])
    assert "## Verdict: HDPO vs SFT (profile oracle)" in text and "## Training" in text
