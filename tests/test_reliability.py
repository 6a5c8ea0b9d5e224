"""Failure behaviour, in process: bad numbers and paths get errors naming the key, file or row;
checkpoints load without running code, fall back past damaged ones and refuse another run's;
non-finite steps never reach the weights or an export; run directories hold one run; a full disk
is reported as such. (tests/test_reliability_cli.py runs the process-level cases.)"""

import json
import logging
import os
import pickle

import pytest
import torch
from test_sft import sft_data

from polyfast.cli import main
from polyfast.config import HDPOConfig, SFTConfig, load_config
from polyfast.data import byte_tokenizer, load_pairs, load_records
from polyfast.errors import ConfigError, DataError, NonFiniteError, RunError
from polyfast.train import checkpoint as ckpt_mod
from polyfast.train.guard import NonFiniteGuard
from polyfast.train.sft import SFTTrainer
from tests.utils import killed_at

TINY = {"model.tiny.hidden_size": 32, "model.tiny.num_layers": 1, "model.tiny.num_heads": 2,
        "model.tiny.num_kv_heads": 1, "model.tiny.intermediate_size": 64, "train.progress": False,
        "train.lr": 1e-3, "data.max_tokens": 1024}


def _trainer(run_dir, **over):
    tok = byte_tokenizer()
    cfg = load_config(SFTConfig, None, [], extra={**TINY, "run_dir": str(run_dir), **over})
    return SFTTrainer(cfg, data=sft_data(tok), tokenizer=tok)


def _rows(run_dir, event=None):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if event is None or r.get("event") == event]


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


# -- 3. garbage numbers -------------------------------------------------------------------------


@pytest.mark.parametrize("cls,override,key", [
    (SFTConfig, "train.max_steps=-1", "train.max_steps"),
    (SFTConfig, "train.max_steps=0", "train.max_steps"),
    (SFTConfig, "train.log_every=0", "train.log_every"),
    (SFTConfig, "data.weight_power=-0.5", "data.weight_power"),
    (SFTConfig, "data.weight_clip=0", "data.weight_clip"),
    (SFTConfig, "train.lr=.nan", "train.lr"),
    (SFTConfig, "train.epochs=.inf", "train.epochs"),
    (SFTConfig, "train.betas=[0.9, 1.5]", "train.betas"),
    (SFTConfig, "train.grad_accum=0", "train.grad_accum"),
    (HDPOConfig, "hdpo.beta=0", "hdpo.beta"),
    (HDPOConfig, "hdpo.reg_lambda=.nan", "hdpo.reg_lambda"),
    (HDPOConfig, "hdpo.label_smoothing=0.5", "hdpo.label_smoothing"),
])
def test_out_of_range_and_non_finite_config_values_name_the_key(cls, override, key):
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [override])
    assert e.value.key == key, str(e.value)
    assert f"'{key}'" in str(e.value)


def _write_jsonl(path, rows):
    # json.dumps writes NaN and Infinity as bare literals, which json.loads reads back
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_bad_dist_sft_weight_names_file_and_row(tmp_path, value):
    path = _write_jsonl(tmp_path / "sft.jsonl", [
        {"instruction": "q1", "output": "a1", "dist_sft_weight": 1.0},
        {"instruction": "q2", "output": "a2", "dist_sft_weight": value}])
    with pytest.raises(DataError) as e:
        load_records(path)
    assert e.value.row == 2 and "dist_sft_weight" in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("key,value", [("hdpo_weight", float("nan")), ("hdpo_weight", -2.0),
                                       ("chosen_dist_score", float("inf"))])
def test_bad_pair_numbers_name_file_and_row(tmp_path, key, value):
    row = {"instruction": "q", "chosen": "human", "rejected": "model", "hdpo_weight": 1.0}
    path = _write_jsonl(tmp_path / "pairs.jsonl", [row, {**row, key: value}])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert e.value.row == 2 and key in str(e.value)


def test_duplicate_prediction_ids_are_an_error_naming_both_rows(tmp_path):
    from polyfast.eval.generate import load_predictions
    path = _write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": "x"},
                                               {"id": "b", "prediction": "y"},
                                               {"id": "a", "prediction": "z"}])
    with pytest.raises(DataError) as e:
        load_predictions(str(path))
    assert e.value.row == 3 and "duplicate id 'a' (first at row 1)" in str(e.value)


# -- 7. messages instead of tracebacks ------------------------------------------------------------


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("polyfast: error: ") and "Traceback" not in err, err
    return err


def test_file_problems_are_messages_naming_the_path_or_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run_dir: x\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    err = _cli_error(capsys, ["sft", str(cfg), f"data.train={data_dir}"])
    assert str(data_dir) in err and "is a directory" in err
    err = _cli_error(capsys, ["data", "stats", str(data_dir)])
    assert str(data_dir) in err and "is a directory" in err
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run_dir: caf\u00e9\n".encode("latin-1"))
    err = _cli_error(capsys, ["sft", str(latin1)])
    assert str(latin1) in err and "not UTF-8" in err and "line 1" in err
    err = _cli_error(capsys, ["sft", str(cfg), "train.betas=[0.9"])
    assert "'train.betas'" in err and "not valid YAML" in err
    err = _cli_error(capsys, ["sft", str(tmp_path)])
    assert str(tmp_path) in err and "not a file" in err


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
    """A tiny exported model directory (config, safetensors weights, tokenizer)."""
    from transformers import AutoModelForCausalLM

    from polyfast.config import TinyModelConfig
    from polyfast.model import tiny_config
    tok = byte_tokenizer()
    path = tmp_path_factory.mktemp("model")
    model = AutoModelForCausalLM.from_config(tiny_config(
        TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=32), tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _broken_copy(src, dst, drop=(), truncate=()):
    import shutil
    shutil.copytree(src, dst)
    for name in drop:
        os.remove(dst / name)
    for name in truncate:
        raw = (dst / name).read_bytes()
        (dst / name).write_bytes(raw[: len(raw) // 2])
    return dst


def test_broken_model_directories_name_the_file(exported_model, tmp_path, capsys):
    from polyfast.config import ModelConfig
    from polyfast.data import load_tokenizer
    from polyfast.model import load_model
    tok = byte_tokenizer()
    trunc = _broken_copy(exported_model, tmp_path / "trunc", truncate=["model.safetensors"])
    with pytest.raises(ConfigError) as e:
        load_model(ModelConfig(path=str(trunc)), tok)
    assert e.value.key == "model.path" and str(trunc / "model.safetensors") in str(e.value)
    no_cfg = _broken_copy(exported_model, tmp_path / "nocfg", drop=["config.json"])
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(ModelConfig(path=str(no_cfg)), tok)
    tok_files = [f for f in os.listdir(exported_model) if f.startswith(("tokenizer", "special_"))
                 or f == "chat_template.jinja"]
    no_tok = _broken_copy(exported_model, tmp_path / "notok", drop=tok_files)
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(str(no_tok))
    # through the CLI: a message, not a traceback
    err = _cli_error(capsys, ["generate", "--model", str(trunc), "--data", "demo:train",
                              "--out", str(tmp_path / "p.jsonl")])
    assert "model.safetensors" in err and "--model" in err


# -- 1 and 5. checkpoints: no code from the files, damaged ones skipped, another run refused ---------


class _Payload:
    """Unpickling this creates ``marker``: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def run_with_checkpoints(tmp_path):
    """A run killed after step 5, with checkpoints at steps 2 and 4 (and metrics rows to 5)."""
    tr = _trainer(tmp_path / "run", **{"train.max_steps": 8, "train.save_every": 2,
                                       "train.checkpoint_hf": False, "train.keep_checkpoints": 3})
    killed_at(tr, 5)
    ckpts = ckpt_mod.list_checkpoints(tr.cfg.run_dir)
    assert [os.path.basename(c) for c in ckpts] == ["step_000002", "step_000004"]
    return tr.cfg.run_dir, ckpts


def test_planted_pickle_payloads_are_never_executed(run_with_checkpoints, tmp_path, caplog):
    run_dir, (older, latest) = run_with_checkpoints
    marker = tmp_path / "payload_ran"
    # 1. the old attack: a pickled train_state.pt (polyfast reads train_state.json, never this)
    torch.save({"scheduler": _Payload(marker)}, os.path.join(latest, "train_state.pt"))
    # 2. DCP's .metadata, which DCP itself unpickles in full
    with open(os.path.join(older, ".metadata"), "wb") as f:
        pickle.dump(_Payload(marker), f)
    # 3. a non-tensor value (an optimizer hyperparameter), which DCP stores pickled
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tr = _trainer(run_dir, **{"train.max_steps": 8, "train.resume": True,
                              "train.checkpoint_hf": False})
    model_sd, optim_sd = get_state_dict(tr.runner, tr.optimizer)
    optim_sd["param_groups"][0]["lr"] = _Payload(marker)
    evil = os.path.join(run_dir, "checkpoints", "step_000006")
    with ckpt_mod.single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=evil, no_dist=True)
    for name in ("trainer_state.json", "train_state.json"):
        with open(os.path.join(latest, name)) as src, open(os.path.join(evil, name), "w") as dst:
            state = json.load(src)
            dst.write(json.dumps({**state, "step": 6} if name == "trainer_state.json" else state))

    with caplog.at_level(logging.WARNING, logger="polyfast"):
        assert tr.resume()
    assert not marker.exists(), "a payload ran"
    assert tr.resumed_from == latest and tr.step == 4  # step 6 refused, step 4 loads (its .pt ignored)
    assert "step_000006 cannot be loaded" in caplog.text and "Unsupported global" in caplog.text

    os.rename(latest, latest + "_gone")  # now only the poisoned steps 6 and 2 are left
    tr2 = _trainer(run_dir, **{"train.max_steps": 8, "train.resume": True,
                               "train.checkpoint_hf": False})
    with pytest.raises(RunError) as e:
        tr2.resume()
    assert not marker.exists(), "a payload ran"
    assert "no loadable checkpoint" in str(e.value)
    assert "step_000002: " in str(e.value) and "refusing to build" in str(e.value)


def test_a_damaged_latest_checkpoint_falls_back_and_metrics_keep_one_row_per_step(
        run_with_checkpoints, caplog):
    run_dir, (older, latest) = run_with_checkpoints
    shard = next(f for f in os.listdir(latest) if f.endswith(".distcp"))
    with open(os.path.join(latest, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(latest, shard)) // 3)
    tr = _trainer(run_dir, **{"train.max_steps": 8, "train.save_every": 2,
                              "train.checkpoint_hf": False, "train.resume": True})
    with caplog.at_level(logging.WARNING, logger="polyfast"):
        tr.fit()
    assert f"checkpoint {latest} cannot be loaded" in caplog.text
    rows = _rows(run_dir)
    steps = [r["step"] for r in rows if r["event"] == "train"]
    assert steps == list(range(1, 9))  # rows 3..5 of the killed run replaced, not duplicated
    resume = [r for r in rows if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 2 and resume[0]["checkpoint"] == older
    events = [(r["event"], r.get("step")) for r in rows]
    assert events[events.index(("resume", 2)) - 1] == ("train", 2)


def test_resume_refuses_a_checkpoint_of_another_run(run_with_checkpoints):
    run_dir, _ = run_with_checkpoints
    tr = _trainer(run_dir, **{"train.max_steps": 8, "train.resume": True, "train.lr": 2e-3,
                              "train.checkpoint_hf": False, "seed": 3})
    with pytest.raises(RunError) as e:
        tr.fit()
    msg = str(e.value)
    assert "belongs to a different run" in msg
    assert "train.lr: 0.001 there, 0.002 here" in msg and "seed: 0 there, 3 here" in msg
    # keys that do not change what is computed may change on resume
    ok = _trainer(run_dir, **{"train.max_steps": 8, "train.resume": True, "train.log_every": 3,
                              "train.checkpoint_hf": True, "train.save_every": 0})
    assert ok.resume() and ok.step == 4


def test_resume_without_a_checkpoint_says_so(tmp_path, caplog):
    tr = _trainer(tmp_path / "run", **{"train.max_steps": 2, "train.resume": True})
    with caplog.at_level(logging.WARNING, logger="polyfast"):
        tr.fit()
    assert "no checkpoint" in caplog.text and "starting from step 0" in caplog.text
    assert [r["step"] for r in _rows(tr.cfg.run_dir, "train")] == [1, 2]


# -- 4. run directories ----------------------------------------------------------------------------


def test_a_run_directory_holds_one_run(tmp_path):
    run = tmp_path / "run"
    first = _trainer(run, **{"train.max_steps": 4, "train.save_every": 2})
    first.fit()
    old_ckpts = ckpt_mod.list_checkpoints(str(run))
    assert old_ckpts and (run / "final").is_dir()
    with pytest.raises(RunError, match="holds a finished run .*--overwrite"):
        _trainer(run, **{"train.max_steps": 3}).fit()
    with pytest.raises(RunError, match="nothing to resume"):
        _trainer(run, **{"train.max_steps": 4, "train.resume": True}).fit()
    with pytest.raises(ConfigError, match="train.overwrite"):
        _trainer(run, **{"train.resume": True, "train.overwrite": True}).fit()
    # --overwrite: the old run's checkpoints and log go, the new run's come
    again = _trainer(run, **{"train.max_steps": 3, "train.overwrite": True})
    again.fit()
    assert not any(os.path.exists(c) for c in old_ckpts)
    assert [r["step"] for r in _rows(run, "train")] == [1, 2, 3]
    assert len(_rows(run, "summary")) == 1


def test_an_unfinished_run_is_refused_to_a_new_run(run_with_checkpoints):
    run_dir, _ = run_with_checkpoints
    with pytest.raises(RunError, match="unfinished run .*step_000004.*train.resume=true"):
        _trainer(run_dir, **{"train.max_steps": 8}).fit()


def test_the_lock_refuses_a_second_holder_and_names_it(tmp_path):
    from polyfast.train.rundir import RunLock, check_unlocked
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / ".polyfast.lock", os.O_RDWR | os.O_CREAT)
    import fcntl
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description, as another process has
    os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "since": "then"}).encode())
    try:
        with pytest.raises(RunError, match="in use by another polyfast run .pid 4242 on elsewhere"):
            check_unlocked(str(run))
        with pytest.raises(RunError, match="pid 4242"):
            _trainer(run, **{"train.max_steps": 1}).fit()
        assert not (run / "metrics.jsonl").exists()  # refused before writing anything
    finally:
        os.close(fd)
    with RunLock(str(run)):  # released: free again
        pass


# -- 2. non-finite steps ------------------------------------------------------------------------------


def _poison_step(trainer, bad_steps):
    """forward_backward that leaves NaN gradients (and a NaN loss) on the given steps."""
    real = trainer.forward_backward

    def fb(packs, step_packs=None):
        out = real(packs, step_packs)
        if trainer.step + 1 in bad_steps:
            for p in trainer.model.parameters():
                p.grad.fill_(float("nan"))
            out["loss"] = out["loss"] * float("nan")
        return out
    trainer.forward_backward = fb


@pytest.mark.parametrize("deferred", [True, False])
def test_skip_mode_keeps_a_nan_step_out_of_the_weights(tmp_path, deferred):
    tr = _trainer(tmp_path / "run", **{"train.max_steps": 5, "train.nonfinite": "skip",
                                       "train.max_skipped_steps": 1, "train.log_every": 2})
    tr.guard = NonFiniteGuard(tr.optimizer, tr.device, deferred=deferred)
    assert tr.guard.deferred == deferred  # fused AdamW on this CPU: the on-device skip runs here
    _poison_step(tr, {3})
    seen = {}
    real_step = tr.train_step

    def spy(packs):
        before = _params(tr)
        out = real_step(packs)
        seen[tr.step] = (before, _params(tr))
        return out
    tr.train_step = spy
    result = tr.fit()
    before, after = seen[3]
    assert all(torch.equal(before[k], after[k]) for k in before)  # step 3 changed nothing
    assert any(not torch.equal(seen[4][0][k], seen[4][1][k]) for k in before)  # step 4 updates
    state = tr.optimizer.state[next(tr.model.parameters())]
    assert int(state["step"]) == 4  # 5 steps, one skipped: AdamW's bias correction skips it too
    assert result["summary"]["skipped_steps"] == [3]
    (row,) = _rows(tr.cfg.run_dir, "nonfinite")
    assert row["step"] == 3 and row["update"] == "skipped"
    assert os.path.isdir(os.path.join(tr.cfg.run_dir, "final"))


def test_stop_mode_and_the_skip_limit_stop_without_an_export(tmp_path):
    tr = _trainer(tmp_path / "a", **{"train.max_steps": 6})
    _poison_step(tr, {2})
    with pytest.raises(NonFiniteError, match="step 2: the loss is nan") as e:
        tr.fit()
    assert e.value.step == 2 and not os.path.exists(os.path.join(tr.cfg.run_dir, "final"))
    tr = _trainer(tmp_path / "b", **{"train.max_steps": 8, "train.nonfinite": "skip",
                                     "train.max_skipped_steps": 2})
    _poison_step(tr, {2, 4, 5, 6})
    with pytest.raises(NonFiniteError, match=r"3 steps .*steps 2, 4, 5.*max_skipped_steps=2"):
        tr.fit()
    assert not os.path.exists(os.path.join(tr.cfg.run_dir, "final"))


def test_non_finite_parameters_are_never_checkpointed_or_exported(tmp_path):
    tr = _trainer(tmp_path / "run", **{"train.max_steps": 4, "train.save_every": 2})
    real = tr.train_step

    def overflow(packs):  # a finite update that leaves an infinity behind
        out = real(packs)
        if tr.step == 2:
            with torch.no_grad():
                next(tr.model.parameters())[0, 0] = float("inf")
        return out
    tr.train_step = overflow
    with pytest.raises(NonFiniteError, match="holds non-finite values: checkpoint step 2 was not"):
        tr.fit()
    assert ckpt_mod.list_checkpoints(tr.cfg.run_dir) == []
    assert not os.path.exists(os.path.join(tr.cfg.run_dir, "final"))


# -- 6. disk full -------------------------------------------------------------------------------------


def test_an_export_into_a_directory_that_does_not_exist_yet_creates_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from polyfast.config import TinyModelConfig
    from polyfast.model import tiny_config
    tok = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(
        TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=32), tok))
    out = ckpt_mod.export_pretrained(model, tok, str(tmp_path / "new" / "deeper" / "start"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    tr = _trainer(tmp_path / "run", **{"train.max_steps": 2})
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda path: 1000)
    with pytest.raises(RunError) as e:
        tr.save()
    msg = str(e.value)
    assert msg.startswith("disk full: checkpoint step 0 needs about")
    assert os.path.join(tr.cfg.run_dir, "checkpoints") in msg and "0.0 MiB free" in msg
    assert os.listdir(os.path.join(tr.cfg.run_dir, "checkpoints")) == []


def test_a_write_that_runs_out_of_space_cleans_up_and_says_so(tmp_path, monkeypatch):
    tr = _trainer(tmp_path / "run", **{"train.max_steps": 2, "train.checkpoint_hf": False})
    first = tr.save()
    real_save = ckpt_mod.dcp.save

    def short_write(state, checkpoint_id, **kw):  # torch's stream writer on a full disk says this
        real_save(state, checkpoint_id=checkpoint_id, **kw)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4240")
    monkeypatch.setattr(ckpt_mod.dcp, "save", short_write)
    tr.step = 1
    with pytest.raises(RunError) as e:
        tr.save()
    msg = str(e.value)
    assert msg.startswith("disk full: checkpoint step 1") and "partial checkpoint was removed" in msg
    assert f"the previous checkpoint {first} is intact" in msg
    assert os.listdir(os.path.join(tr.cfg.run_dir, "checkpoints")) == ["step_000000"]
    assert ckpt_mod.trainer_state(first)["step"] == 0


class _SlowEvent:
    """A CUDA event whose work never completes until waited on (a device far behind)."""

    def record(self):
        self.done = False

    def query(self):
        return False

    def synchronize(self):
        self.done = True


def test_the_deferred_guard_loses_no_step_when_the_device_lags_a_whole_ring():
    """The CUDA bookkeeping (pinned ring of copies, events) on this CPU, with events that land
    only when waited on: bad steps are reported with their step and values, in order, once."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = NonFiniteGuard(opt, torch.device("cpu"), deferred=True)
    guard.cuda, guard.host = True, torch.empty(guard.RING, 2)
    guard.events = [_SlowEvent() for _ in range(guard.RING)]
    guard.busy = [False] * guard.RING
    found = []
    for step in range(1, 2 * guard.RING + 4):
        p.grad = torch.full((3,), float("nan") if step in (5, 20) else 1.0)
        loss = torch.tensor(float("inf") if step == 9 else 2.0)
        found += guard.step(step, loss, p.grad.norm())
        if step <= guard.RING:
            assert found == []  # nothing has landed: no sync was forced yet
    found += guard.poll(wait=True)
    assert [b.step for b in found] == [5, 9, 20]
    assert found[1].loss == float("inf") and found[1].grad_norm == pytest.approx(3 ** 0.5)
    assert int(opt.state[p]["step"]) == 2 * guard.RING + 3 - 3  # the three bad updates skipped


def _occupied(path) -> int:
    """What a directory tree occupies on disk, as du counts it (allocated blocks)."""
    total = os.stat(path).st_blocks * 512
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


@pytest.mark.parametrize("hidden,layers", [(32, 1), (160, 3)])
@pytest.mark.parametrize("hf", [False, True])
def test_the_space_check_estimates_a_checkpoint_within_a_quarter(tmp_path, monkeypatch, hidden,
                                                                 layers, hf):
    tr = _trainer(tmp_path / "run", **{"train.max_steps": 2, "train.checkpoint_hf": hf,
                                       "model.tiny.hidden_size": hidden,
                                       "model.tiny.num_layers": layers,
                                       "model.tiny.intermediate_size": 2 * hidden})
    tr.train_step(tr.step_packs(0))  # AdamW's moments exist from the first step on
    asked = []
    real_on_disk = ckpt_mod.on_disk
    monkeypatch.setattr(ckpt_mod, "on_disk",
                        lambda sizes, block: asked.append(real_on_disk(sizes, block)) or asked[-1])
    path = tr.save()
    occupied = _occupied(path)
    assert occupied <= asked[0] <= 1.25 * occupied, (asked[0], occupied)
    if hf:  # the final export's own check
        asked.clear()
        out = ckpt_mod.export_pretrained(tr.model, tr.tokenizer, str(tmp_path / "final"))
        assert _occupied(out) <= asked[0] <= 1.25 * _occupied(out), (asked[0], _occupied(out))

    # a disk with room for one more checkpoint and a half is not refused; one without is
    tr.step = 2
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda p: int(1.5 * occupied))
    tr.save()
    tr.step = 3
    monkeypatch.setattr(ckpt_mod, "free_bytes", lambda p: int(0.9 * occupied))
    with pytest.raises(RunError, match="disk full: checkpoint step 3"):
        tr.save()
