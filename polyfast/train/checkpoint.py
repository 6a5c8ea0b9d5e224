"""Atomic checkpoints with exact resume, and the final Hugging Face export.

A checkpoint is a directory ``checkpoints/step_000123`` holding ``model.safetensors``, the optimizer
and scheduler state, the RNG states and ``trainer_state.json``. It is written to a temporary
directory beside it and renamed into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_model, save_model

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


def save_checkpoint(run_dir: str, step: int, model, optimizer, scheduler, extra: dict,
                    keep: int = 2) -> str:
    root = os.path.join(run_dir, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp_step_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state()}, os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump({"step": step, **extra}, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step_")]


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG; return trainer_state.json."""
    load_model(model, os.path.join(path, "model.safetensors"))
    state = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


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
