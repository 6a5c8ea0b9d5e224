"""Experiment trackers without a network: Weights & Biases offline, MLflow on a local file store,
Trackio's local database. Each gets the config once and the numbers of metrics.jsonl, step by step,
and a run killed and resumed continues the same tracker run with no step sent twice."""

import json
import os
import struct
import sys

import pytest
from test_sft import sft_data

from polyfast.config import SFTConfig, load_config
from polyfast.data import byte_tokenizer
from polyfast.errors import ConfigError
from polyfast.train.sft import SFTTrainer
from tests.utils import killed_at

TINY = {"model.tiny.hidden_size": 32, "model.tiny.num_layers": 1, "model.tiny.num_heads": 2,
        "model.tiny.num_kv_heads": 1, "model.tiny.intermediate_size": 64, "train.progress": False,
        "train.lr": 1e-3, "data.max_tokens": 1024, "train.checkpoint_hf": False,
        "train.max_steps": 8, "train.save_every": 2, "train.run_name": "tracked",
        "train.project": "polyfast-test"}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow's local file store
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    return tmp_path


def _trainer(run_dir, report_to, **over):
    tok = byte_tokenizer()
    cfg = load_config(SFTConfig, None, [], extra={**TINY, "run_dir": str(run_dir),
                                                  "train.report_to": report_to, **over})
    return SFTTrainer(cfg, data=sft_data(tok), tokenizer=tok)


def _killed_and_resumed(run_dir, report_to):
    """A run killed after step 5 (checkpoint at 4), then resumed to step 8."""
    killed_at(_trainer(run_dir, report_to), 5)
    _trainer(run_dir, report_to, **{"train.resume": True}).fit()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if r["event"] == "train"}


def _wandb_records(path):
    """The records of a .wandb file: W&B's header, then 32 KiB blocks of records, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


@pytest.mark.slow  # (wandb starts its service process)
def test_wandb_offline_gets_every_step_once_and_resumes_the_same_run(offline):
    pytest.importorskip("wandb", reason="the optional wandb extra: pip install polyfast[wandb]")
    run_dir = offline / "run"
    train = _killed_and_resumed(run_dir, ["wandb"])
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # the killed run and its resumption
    ids, configs, losses = set(), [], {}
    for path in files:
        for r in _wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
                configs.append({u.key: json.loads(u.value_json) for u in r.run.config.update})
            elif kind == "history":
                item = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in r.history.item}
                if "train/loss" in item:
                    assert item["_step"] not in losses, f"step {item['_step']} sent twice"
                    losses[item["_step"]] = item
    assert len(ids) == 1 and ids == {json.load(open(run_dir / "trackers.json"))["wandb"]["id"]}
    assert configs[0]["train"]["lr"] == 1e-3 and configs[0]["run_dir"] == str(run_dir)
    assert sorted(losses) == list(range(1, 9))
    for step, row in train.items():
        assert losses[step]["train/loss"] == pytest.approx(row["loss"], rel=1e-5)
        assert losses[step]["train/lr"] == pytest.approx(row["lr"], rel=1e-9)
        bucket = next(iter(row["bucket_loss"]))
        assert losses[step][f"train/bucket_loss/{bucket}"] == pytest.approx(
            row["bucket_loss"][bucket], rel=1e-5)


def test_mlflow_file_store_gets_every_step_once_and_resumes_the_same_run(offline):
    pytest.importorskip("mlflow", reason="the optional mlflow extra: pip install polyfast[mlflow]")
    from mlflow.tracking import MlflowClient

    run_dir = offline / "run"
    train = _killed_and_resumed(run_dir, ["mlflow"])
    client = MlflowClient()
    exp = client.get_experiment_by_name("polyfast-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "tracked"
    run = runs[0]
    assert run.info.run_id == json.load(open(run_dir / "trackers.json"))["mlflow"]["run_id"]
    assert run.data.params["train.lr"] == "0.001" and run.data.tags["run_dir"] == str(run_dir)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, 9)), steps  # no step twice after the resume
    for m in history:
        assert m.value == pytest.approx(train[m.step]["loss"], rel=1e-5)
    bucket = next(iter(train[8]["bucket_loss"]))
    key = "train/bucket_loss/" + bucket.replace("|", "_")
    assert client.get_metric_history(run.info.run_id, key)[-1].value == pytest.approx(
        train[8]["bucket_loss"][bucket], rel=1e-5)
    assert {"eval/macro", "summary/tokens_per_s"} <= set(run.data.metrics)


def test_trackio_local_gets_every_step_once(offline):
    pytest.importorskip("trackio", reason="the optional trackio extra: pip install "
                                          "polyfast[trackio]")
    from trackio.sqlite_storage import SQLiteStorage

    train = _killed_and_resumed(offline / "run", ["trackio"])
    logs = [r for r in SQLiteStorage.get_logs("polyfast-test", "tracked") if "train/loss" in r]
    assert sorted(r["step"] for r in logs) == list(range(1, 9))
    for r in logs:
        assert r["train/loss"] == pytest.approx(train[r["step"]]["loss"], rel=1e-5)
    assert SQLiteStorage.get_run_config("polyfast-test", "tracked")["train"]["lr"] == 1e-3


@pytest.mark.parametrize("name,module", [("wandb", "wandb"), ("mlflow", "mlflow.tracking"),
                                         ("trackio", "trackio")])
def test_a_missing_tracker_is_one_line_naming_its_install(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    tr = _trainer(tmp_path / "run", [name], **{"train.max_steps": 1})
    with pytest.raises(ConfigError) as e:
        tr.fit()
    assert e.value.key == "train.report_to"
    assert f"pip install polyfast[{name}]" in str(e.value)
