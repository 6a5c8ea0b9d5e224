"""One run per run directory, one process group at a time.

- A lock: the first run on a directory holds ``run_dir/.polyfast.lock`` (``flock``, released by the
  kernel when the process exits, however it exits); a second run is refused at once, naming the
  holder's pid and host (read back from the lock file as JSON).
- A run identity: the config keys that shape the training trajectory (everything but the keys in
  ``RESUMABLE_KEYS``: logging, saving, devices, kernels), stored with every checkpoint; resuming
  from a checkpoint of a different identity is refused, naming the keys that differ.
- A new run into a directory that already holds a run (a finished one's ``final/`` or summary, an
  unfinished one's checkpoints or log) is refused unless ``train.overwrite`` (``--overwrite``), which
  removes that run's files first.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass

from ..config import flatten, to_dict
from ..errors import RunError
from .checkpoint import CKPT_DIR, list_checkpoints

LOCK_FILE = ".polyfast.lock"

# keys a resumed run may change: they do not change what the run computes (train.grad_accum may
# change with the number of processes; the trainer checks that a step still holds the same packs)
RESUMABLE_KEYS = {
    "run_dir", "train.resume", "train.overwrite", "train.progress", "train.log_every",
    "train.eval_every", "train.save_every", "train.keep_checkpoints", "train.checkpoint_hf",
    "train.device", "train.num_threads", "train.tf32", "train.loss_backend", "train.nonfinite",
    "train.max_skipped_steps", "train.grad_accum", "train.report_to", "train.run_name",
    "train.project", "model.activation_checkpointing",
    "model.compile", "model.liger", "model.lora.export",
    "hdpo.loss_backend", "hdpo.frozen", "data.val", "data.val_pairs", "data.test",
}


# -- the lock ----------------------------------------------------------------------------------


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``run_dir/.polyfast.lock`` holding the holder's pid,
    host and start time. Works on local filesystems and NFS (where Linux maps flock to POSIX
    locks)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunError(f"{os.path.dirname(self.path)} is in use by another polyfast run "
                           f"({holder}); wait for it to end, or give this run another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def check_unlocked(run_dir: str) -> None:
    """Refuse now if another run holds ``run_dir`` (the trainer takes the lock itself later)."""
    if os.path.isdir(run_dir):
        RunLock(run_dir).acquire().release()


# -- what a directory holds -----------------------------------------------------------------------


@dataclass
class RunDirState:
    checkpoints: list[str]
    final: bool          # final/ exported
    metrics: bool        # metrics.jsonl exists
    finished: bool       # a summary row in metrics.jsonl

    @property
    def empty(self) -> bool:
        return not (self.checkpoints or self.final or self.metrics)


def inspect(run_dir: str) -> RunDirState:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    finished = False
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8", errors="replace") as f:
            finished = any('"event": "summary"' in line for line in f)
    return RunDirState(list_checkpoints(run_dir), os.path.isdir(os.path.join(run_dir, "final")),
                       os.path.isfile(metrics), finished)


def refusal(run_dir: str, resume: bool) -> str | None:
    """Why a run (new, or resumed with ``resume``) may not start in ``run_dir``, or None."""
    s = inspect(run_dir)
    if s.final or s.finished:
        what = "a finished run (" + " and ".join(
            x for x, has in (("final/", s.final), ("a summary in metrics.jsonl", s.finished)) if has) + ")"
        if resume:
            return (f"{run_dir} holds {what}: there is nothing to resume. --overwrite "
                    "(train.overwrite=true) trains it again from the start")
        return (f"{run_dir} holds {what}: --overwrite (train.overwrite=true) replaces it, or "
                "give this run another run_dir")
    if resume or s.empty:
        return None
    if s.checkpoints:
        return (f"{run_dir} holds an unfinished run (latest checkpoint "
                f"{os.path.basename(s.checkpoints[-1])}): train.resume=true continues it, "
                "--overwrite (train.overwrite=true) replaces it")
    return (f"{run_dir} holds the log of an earlier run (metrics.jsonl, no checkpoint): "
            "--overwrite (train.overwrite=true) replaces it, or give this run another run_dir")


def clear(run_dir: str) -> None:
    """Remove what a run wrote (checkpoints, export, log, config); caches of the reference
    log-probs stay (they are keyed by their inputs)."""
    for name in (CKPT_DIR, "final", "final.tmp"):
        shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    for name in ("metrics.jsonl", "config.yaml", "trackers.json"):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))


def remove_partial(run_dir: str) -> list[str]:
    """Temporary directories a killed run left (half-written checkpoints or export); only safe
    under the lock. Returns what was removed."""
    root = os.path.join(run_dir, CKPT_DIR)
    partial = [os.path.join(root, d) for d in (os.listdir(root) if os.path.isdir(root) else [])
               if d.startswith(".tmp_")]
    if os.path.isdir(os.path.join(run_dir, "final.tmp")):
        partial.append(os.path.join(run_dir, "final.tmp"))
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


# -- run identity ------------------------------------------------------------------------------


def identity(cfg) -> dict:
    """The dotted config keys that define the run, with their values."""
    return {k: v for k, v in flatten(to_dict(cfg)).items() if k not in RESUMABLE_KEYS}


def _show(value, missing) -> str:
    return "unset" if value is missing else json.dumps(value)


def identity_diff(saved: dict, current: dict) -> list[str]:
    """'key: A there, B here' for every key whose value differs."""
    missing = object()
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, missing), current.get(k, missing)
        if a != b:
            out.append(f"{k}: {_show(a, missing)} there, {_show(b, missing)} here")
    return out
