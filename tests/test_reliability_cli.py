"""Failure behaviour of the real CLI, in processes: kill -9 during a checkpoint write, two runs on
one directory, a diverging run, a full disk (a small tmpfs in a user and mount namespace)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

pytestmark = pytest.mark.slow  # subprocess runs of the CLI, killed and resumed

TINY = {"model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                           "intermediate_size": 64}},
        "data": {"train": "demo", "val": None, "max_tokens": 1024},
        "train": {"lr": 1e-3, "log_every": 1, "progress": False, "num_threads": 1}}


def _config(tmp_path, run_dir, **train):
    cfg = json.loads(json.dumps(TINY))
    cfg["run_dir"] = str(run_dir)
    cfg["train"].update(train)
    path = tmp_path / f"{os.path.basename(run_dir)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the CPU path runs no Triton kernel
    return env


def _polyfast(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "polyfast", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), check=False)


def _rows(run_dir, event=None):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if event is None or r["event"] == event]


def test_kill_9_during_a_checkpoint_write_then_resume_matches_a_straight_run(tmp_path):
    steps = 24
    straight = tmp_path / "straight"
    res = _polyfast("sft", _config(tmp_path, straight, max_steps=steps, save_every=1))
    assert res.returncode == 0, res.stderr
    expected = {r["step"]: r["loss"] for r in _rows(straight, "train")}

    run = tmp_path / "killed"
    cfg = _config(tmp_path, run, max_steps=steps, save_every=1)
    proc = subprocess.Popen([sys.executable, "-m", "polyfast", "sft", cfg], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = run / "checkpoints"
    try:  # kill -9 while a checkpoint is being written, once a complete one exists
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            names = os.listdir(root) if root.is_dir() else []
            if any(n.startswith(".tmp_step_") for n in names) and "step_000001" in names:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-write"
    partial = [n for n in os.listdir(root) if n.startswith(".tmp_step_")]
    assert partial, "the kill did not land inside a checkpoint write"
    killed_at = max(r["step"] for r in _rows(run, "train"))

    res = _polyfast("sft", cfg, "train.resume=true")
    assert res.returncode == 0, res.stderr
    assert "left half-written by an earlier run" in res.stderr
    assert not [n for n in os.listdir(root) if n.startswith(".tmp_")]
    rows = _rows(run)
    train = [r["step"] for r in rows if r["event"] == "train"]
    assert train == list(range(1, steps + 1)), train  # one row per step, replayed steps replaced
    (resume,) = [r for r in rows if r["event"] == "resume"]
    assert resume["step"] <= killed_at
    got = {r["step"]: r["loss"] for r in rows if r["event"] == "train"}
    assert got == expected  # bitwise: the resumed trajectory is the straight one
    assert (run / "final" / "model.safetensors").is_file()


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "polyfast", "sft",
                              _config(tmp_path, run, max_steps=100000)],
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run / "metrics.jsonl").exists():
            assert first.poll() is None, "the first run died"
            time.sleep(0.05)
        res = _polyfast("sft", _config(tmp_path, run, max_steps=3))
        assert first.poll() is None  # the holder was alive throughout
        before = (run / "config.yaml").read_text()
    finally:
        first.kill()
        first.wait()
    assert res.returncode == 2
    assert "in use by another polyfast run" in res.stderr and f"pid {first.pid}" in res.stderr
    assert "Traceback" not in res.stderr
    assert "max_steps: 100000" in before  # the second run wrote nothing there


def test_a_diverging_run_stops_naming_the_step_and_exports_nothing(tmp_path):
    run = tmp_path / "stop"
    res = _polyfast("sft", _config(tmp_path, run, max_steps=20, lr=1e6))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (bad, *_) = _rows(run, "nonfinite")
    assert f"polyfast: error: step {bad['step']}: the loss is" in res.stderr
    assert "train.nonfinite=skip" in res.stderr
    assert not (run / "final").exists()

    run = tmp_path / "skip"
    res = _polyfast("sft", _config(tmp_path, run, max_steps=20, lr=1e6, nonfinite="skip",
                                   max_skipped_steps=2))
    assert res.returncode == 2
    assert "3 steps had a non-finite loss or gradient norm" in res.stderr
    assert "more than train.max_skipped_steps=2" in res.stderr
    assert len(_rows(run, "nonfinite")) == 3 and not (run / "final").exists()


def _tmpfs_available() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"],
                           capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _tmpfs_available(),
                    reason="needs unshare with user and mount namespaces to mount a small tmpfs")
def test_a_full_disk_during_a_checkpoint_write_says_so_and_keeps_the_previous_one(tmp_path):
    # the size of one checkpoint of this model, measured
    probe = tmp_path / "probe"
    res = _polyfast("sft", _config(tmp_path, probe, max_steps=2, save_every=1))
    assert res.returncode == 0, res.stderr
    one = sum(-(-os.path.getsize(os.path.join(d, f)) // 4096) * 4096
              for d, _, files in os.walk(probe / "checkpoints" / "step_000001") for f in files)
    # room for the first checkpoint and the run's small files, not for a second checkpoint
    size_kib = (one + one // 2) // 1024 + 64
    mount = tmp_path / "disk"
    mount.mkdir()
    run = mount / "run"
    cfg = _config(tmp_path, run, max_steps=4, save_every=1)
    inner = textwrap.dedent(f"""
        import json, os, sys
        import polyfast.train.checkpoint as ck
        ck.free_bytes = lambda path: 1 << 50  # skip the up-front check: the write itself must fail
        from polyfast.cli import main
        rc = main(["sft", {cfg!r}])
        root = os.path.join({str(run)!r}, "checkpoints")
        print(json.dumps({{"rc": rc, "left": sorted(os.listdir(root))}}))
    """)
    script = tmp_path / "inner.py"
    script.write_text(inner)
    shell = f"mount -t tmpfs -o size={size_kib}k tmpfs {mount} && exec {sys.executable} {script}"
    res = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell],
                         capture_output=True, text=True, timeout=240, env=_env(), check=False)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rc"] == 2, res.stderr
    assert out["left"] == ["step_000001"]  # the partial step_000002 was removed
    assert "polyfast: error: disk full: checkpoint step 2 needs about" in res.stderr
    assert f"in {run / 'checkpoints'}" in res.stderr
    assert "the previous checkpoint" in res.stderr and "step_000001 is intact" in res.stderr
    assert "Traceback" not in res.stderr
