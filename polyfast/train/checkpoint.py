"""Resumable checkpoints through torch.distributed.checkpoint (DCP), and the final HF export.

A checkpoint is a directory ``checkpoints/step_000123`` holding the model and optimizer state in DCP's
format (each rank writes its own shards; keys are the parameters' fully qualified names, so a
checkpoint loads into any world size: DCP reshards on load), ``train_state.json`` (scheduler and RNG
state, from rank 0), ``trainer_state.json`` (step, total steps, the world size that wrote it, the
run's identity) and, with ``train.checkpoint_hf``, ``hf/``: the model as a Hugging Face export, to
evaluate or serve. Everything is written to a temporary directory beside it and renamed into place
by rank 0 after all ranks have finished, so a crash never leaves a half-written checkpoint. Several
nodes need the run directory on a shared filesystem.

Loading runs no code from the files: the small state is JSON, DCP's tensors load with
``weights_only``, its metadata through an unpickler that builds only DCP's own metadata classes,
and its non-tensor values (the optimizer's hyperparameters) with ``weights_only`` too. A checkpoint
that fails any of this is refused with the reason (``CheckpointUnreadable``); the trainer then falls
back to the one before it.

Before writing, the free space is checked against the checkpoint's size; a write that still fails
for want of space removes its temporary directory and says so (``RunError``), the previous
checkpoint untouched.

``python -m torch.distributed.checkpoint.format_utils dcp_to_torch CKPT out.pt`` turns a checkpoint
into one ``torch.save`` file; the final export (``save_pretrained``) is what other tools load.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import RunError
from .distributed import agree

CKPT_DIR = "checkpoints"
MiB = 2 ** 20


class CheckpointUnreadable(Exception):
    """A checkpoint that cannot be loaded safely or completely; ``str`` says why."""


# -- the small state, as JSON ------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# -- DCP without running code from the files -------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata (its dataclasses, torch.Size, dtypes, layouts, paths) and nothing
    else: any other global in the file is refused."""

    _ALLOWED = frozenset({("torch", "Size"), ("torch.serialization", "_get_layout"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                ("collections", "OrderedDict")})

    def find_class(self, module: str, name: str):
        obj = None
        if (module, name) in self._ALLOWED or module == "torch.distributed.checkpoint.metadata":
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None or (module.endswith(".metadata") and not isinstance(obj, type)):
            raise pickle.UnpicklingError(f"refusing to build {module}.{name}")
        return obj


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = os.path.join(self.path, ".metadata")
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        # what FileSystemReader.read_metadata sets after unpickling
        from torch.distributed.checkpoint.metadata import StorageMeta
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # DCP unpickles non-tensor values in full; decode them with weights_only (numbers,
        # strings, containers, tensors) and hand DCP a re-serialised copy of only that
        obj = torch.load(value, weights_only=True)
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


# -- disk space ------------------------------------------------------------------------------


def _free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _local_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state dict, this rank's shards only."""
    if isinstance(state, dict):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_local_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        t = state.to_local() if hasattr(state, "to_local") else state
        return t.numel() * t.element_size()
    return 0


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain, or torch's stream writer's message for a short
    write (its C++ error carries no errno)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left" in text or "unexpected pos" in text or "Disk quota" in text:
            return True
        if any(_disk_full(e) for e in _rank_errors(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _rank_errors(exc: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside DCP's CheckpointException (a BaseException whose
    ``failures`` maps rank -> (exception, traceback)); [] for any other exception."""
    if not isinstance(exc, CheckpointException):
        return []
    out = []
    for failure in exc.failures.values():
        e = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(e, BaseException):
            out.append(e)
    return out


def _reason(exc: BaseException) -> str:
    """One line saying why: the innermost error, and of a long message its telling line."""
    while True:
        inner = _rank_errors(exc) or [e for e in (exc.__cause__,) if e is not None]
        if not inner:
            break
        exc = inner[0]
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    telling = [ln for ln in lines if "Unsupported global" in ln or "refusing" in ln]
    text = (telling or lines or [""])[0]
    text = text.split(" Please use `torch.serialization")[0]
    return f"{type(exc).__name__}: {text}"[:300]


def _space_error(what: str, where: str, need: int, free: int, after: str) -> RunError:
    return RunError(f"disk full: {what} needs about {need / MiB:,.1f} MiB in {where}, "
                    f"{free / MiB:,.1f} MiB free; {after}")


def _failed_write(exc: BaseException, what: str, where: str, need: int, tmp: str, kept: str,
                  partial: str, remove: bool = True) -> None:
    """After a write of ``what`` into ``tmp`` (the ``partial`` one) failed: remove ``tmp`` (where
    ``remove``), and raise the disk-full RunError if the disk is the cause (the free space is read
    before the removal); return otherwise, for the caller to re-raise ``exc``."""
    free = _free_bytes(where)
    if remove:
        shutil.rmtree(tmp, ignore_errors=True)
    if _disk_full(exc) or free < MiB:
        raise _space_error(what, where, need, free,
                           f"the partial {partial} was removed and {kept}") from exc


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
                    keep: int = 2, also=None, also_bytes: int = 0) -> str:
    """A collective under torchrun: every rank calls it with its (sharded) model and optimizer.
    ``also(tmp_dir)``, called on every rank before the rename, writes more into the checkpoint
    (about ``also_bytes``, for the free-space check)."""
    root = os.path.join(run_dir, CKPT_DIR)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp_step_{step:06d}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    world = dist.get_world_size() if _distributed() else 1
    need = (_local_bytes(model_sd) + _local_bytes(optim_sd)) * world + also_bytes + MiB
    previous = list_checkpoints(run_dir)
    kept = (f"the previous checkpoint {previous[-1]} is intact" if previous
            else "no checkpoint was written")
    problem = None
    if _main():
        os.makedirs(root, exist_ok=True)
        free = _free_bytes(root)
        if free < need:  # refuse before writing anything
            problem = str(_space_error(f"checkpoint step {step}", root, need, free, kept))
    problem = agree(problem)
    if problem:
        raise RunError(problem)
    if _main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    try:
        with _single_process_quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp,
                     no_dist=not _distributed())
        if _main():
            _write_json(os.path.join(tmp, "train_state.json"),
                        {"scheduler": scheduler.state_dict(), "rng": _rng_state()})
            _write_json(os.path.join(tmp, "trainer_state.json"),
                        {"step": step, "world_size": world, **extra})
        if also is not None:
            also(tmp)
    except (Exception, CheckpointException) as e:
        _failed_write(e, f"checkpoint step {step}", root, need, tmp, kept, "checkpoint",
                      remove=_main())
        raise
    _barrier()  # every rank's shards are on disk
    if _main():
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    steps = sorted((int(d[5:]), d) for d in os.listdir(root) if re.fullmatch(r"step_\d+", d))
    return [os.path.join(root, d) for _, d in steps]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CheckpointUnreadable(f"{os.path.basename(path)} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointUnreadable(f"{os.path.basename(path)} is unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointUnreadable(f"{os.path.basename(path)} does not hold an object")
    return obj


def trainer_state(path: str) -> dict:
    """A checkpoint's trainer_state.json: step, total steps, the world size that wrote it, the
    run identity. Raises CheckpointUnreadable."""
    state = _read_json(os.path.join(path, "trainer_state.json"))
    if not isinstance(state.get("step"), int):
        raise CheckpointUnreadable("trainer_state.json has no integer 'step'")
    return state


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG (into whatever sharding ``model`` has now);
    return trainer_state.json. A collective under torchrun. Raises CheckpointUnreadable (nothing
    but the model's and optimizer's tensors is touched before everything has been read)."""
    state_json = trainer_state(path)
    if (not os.path.exists(os.path.join(path, "train_state.json"))
            and os.path.exists(os.path.join(path, "train_state.pt"))):
        raise CheckpointUnreadable("it holds a pickled train_state.pt (an older polyfast's format), "
                                   "which polyfast does not load: unpickling can run code")
    train_state = _read_json(os.path.join(path, "train_state.json"))
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointUnreadable("DCP's .metadata is missing")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=_SafeReader(path), planner=_SafePlanner(),
                     no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # any failure to read is this checkpoint's
        raise CheckpointUnreadable(f"its tensors do not load ({_reason(e)})") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    try:
        scheduler.load_state_dict(train_state["scheduler"])
        _set_rng_state(train_state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointUnreadable(f"train_state.json does not restore ({e!r})") from e
    return state_json


def export_pretrained(model, tokenizer, out_dir: str) -> str:
    """save_pretrained + tokenizer, atomically, in a layout transformers and vLLM load as is."""
    tmp = out_dir.rstrip("/") + ".tmp"
    where = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(where, exist_ok=True)  # (its free space is asked for next)
    shutil.rmtree(tmp, ignore_errors=True)
    need = _local_bytes(model.state_dict()) + MiB
    kept = (f"the previous export {out_dir} is intact" if os.path.exists(out_dir)
            else "nothing was exported")
    free = _free_bytes(where)
    if free < need:
        raise _space_error(f"the export {out_dir}", where, need, free, kept)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    except Exception as e:
        _failed_write(e, f"the export {out_dir}", where, need, tmp, kept, "export")
        raise
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
