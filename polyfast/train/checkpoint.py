"""Resumable checkpoints through torch.distributed.checkpoint (DCP), and the final HF export.

A checkpoint is a directory ``checkpoints/step_000123`` holding the model and optimizer state in DCP's
format (each rank writes its own shards; keys are the parameters' fully qualified names, so a
checkpoint loads into any world size: DCP reshards on load), ``train_state.pt`` (scheduler and RNG
state, from rank 0), ``trainer_state.json`` (step, total steps, the world size that wrote it) and,
with ``train.checkpoint_hf``, ``hf/``: the model as a Hugging Face export, to evaluate or serve.
Everything is written to a temporary directory beside it and renamed into place by rank 0 after all
ranks have finished, so a crash never leaves a half-written checkpoint. Several nodes need the run
directory on a shared filesystem.

``python -m torch.distributed.checkpoint.format_utils dcp_to_torch CKPT out.pt`` turns a checkpoint
into one ``torch.save`` file; the final export (``save_pretrained``) is what other tools load.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

CKPT_DIR = "checkpoints"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _main() -> bool:
    return not _distributed() or dist.get_rank() == 0


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it "assumes the intent" of a single process; it is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(run_dir: str, step: int, model, optimizer, scheduler, extra: dict,
                    keep: int = 2, also=None) -> str:
    """A collective under torchrun: every rank calls it with its (sharded) model and optimizer.
    ``also(tmp_dir)``, called on every rank before the rename, writes more into the checkpoint."""
    root = os.path.join(run_dir, CKPT_DIR)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp_step_{step:06d}")
    if _main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp,
                 no_dist=not _distributed())
    if _main():
        torch.save({"scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   os.path.join(tmp, "train_state.pt"))
        world = dist.get_world_size() if _distributed() else 1
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "world_size": world, **extra}, f, indent=1)
    if also is not None:
        also(tmp)
    _barrier()  # every rank's shards are on disk
    if _main():
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step_")]


def trainer_state(path: str) -> dict:
    """A checkpoint's trainer_state.json: step, total steps, the world size that wrote it."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG (into whatever sharding ``model`` has now);
    return trainer_state.json. A collective under torchrun."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    train_state = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
    scheduler.load_state_dict(train_state["scheduler"])
    _set_rng_state(train_state["rng"])
    return trainer_state(path)


def export_pretrained(model, tokenizer, out_dir: str) -> str:
    """save_pretrained + tokenizer, atomically, in a layout transformers and vLLM load as is."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
