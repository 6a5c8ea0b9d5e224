"""Resumable checkpoints through torch.distributed.checkpoint (DCP), and the final HF export.

A checkpoint is a directory ``checkpoints/step_000123`` holding the model and optimizer state in DCP's
format (each rank writes its own shards; keys are the parameters' fully qualified names, so a
checkpoint loads into any world size: DCP reshards on load), ``train_state.json`` (scheduler and RNG
state, from rank 0), ``trainer_state.json`` (step, total steps, the world size that wrote it, the
run's identity) and, with ``train.checkpoint_hf``, ``hf/``: the model as a Hugging Face export, to
evaluate or serve. Everything is written to a temporary directory beside it and renamed into place
by rank 0 after all ranks have finished, so a crash never leaves a half-written checkpoint. Several
nodes need the run directory on a shared filesystem.

Files read back on resume, and how each is decoded (none of them can run code):

- ``trainer_state.json``, ``train_state.json``: JSON (the RNG states as numbers and base64);
- ``.metadata``, DCP's index (a pickle): ``dcp_metadata.read_metadata``, an unpickler with an
  explicit table of the names and opcodes an index uses;
- ``__*.distcp``, the tensor shards: DCP's reader, which decodes each tensor with
  ``torch.load(weights_only=True)``; the non-tensor values among them (the optimizer's
  hyperparameters) with ``torch.load(weights_only=True)`` too, before DCP sees them (``_SafePlanner``);
- ``train_state.pt`` (an older polyfast's pickled state): never read; such a checkpoint is refused.

A checkpoint that fails any of this is refused with the reason and its path
(``CheckpointUnreadable``); the trainer then falls back to the one before it.

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
import functools
import io
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from .. import lora
from ..errors import DataError, RunError
from ..files import read_json
from .dcp_metadata import MetadataRefused, read_metadata
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


class _SafeReader(FileSystemReader):
    """DCP's reader with the index polyfast decoded itself (dcp_metadata.read_metadata)."""

    def __init__(self, path: str, metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs):
        # what FileSystemReader.read_metadata sets after unpickling
        from torch.distributed.checkpoint.metadata import StorageMeta
        metadata = self._metadata
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


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


_DIRECTORY = 1  # a directory's own entry: one block


def on_disk(sizes, block: int) -> int:
    """What files of these sizes occupy: each rounded up to whole blocks."""
    return sum(-(-int(n) // block) * block for n in sizes)


def _block_size(path: str) -> int:
    try:
        return os.statvfs(path).f_frsize or 4096
    except (AttributeError, OSError):  # (no statvfs on Windows)
        return 4096


@functools.cache
def _torch_save_overhead(dtype: torch.dtype, ndim: int) -> int:
    """Bytes ``torch.save`` adds to a tensor's data (its zip entries and pickle), measured on a
    one-element tensor of this dtype and rank; the data's alignment adds up to 63 more."""
    buf = io.BytesIO()
    t = torch.zeros((1,) * ndim, dtype=dtype)
    torch.save(t, buf)
    return len(buf.getvalue()) - t.element_size() + 63


def _dcp_items(state, path=()):
    """(fqn, value) of what DCP writes as one item, walking ``state`` as DCP does: into every
    mapping, and into a list holding a tensor, a mapping or such a list; each tensor (this rank's
    shard of a DTensor) and every other value is an item."""
    if isinstance(state, dict):
        for k, v in state.items():
            yield from _dcp_items(v, (*path, str(k)))
    elif isinstance(state, list) and _walked(state):
        for i, v in enumerate(state):
            yield from _dcp_items(v, (*path, str(i)))
    elif isinstance(state, torch.Tensor):
        yield ".".join(path), state.to_local() if hasattr(state, "to_local") else state
    else:
        yield ".".join(path), state


def _walked(values: list) -> bool:
    return any(isinstance(v, (dict, torch.Tensor)) or (isinstance(v, list) and _walked(v))
               for v in values)


def dcp_bytes(state: dict) -> tuple[int, int]:
    """(this rank's shard file, the index) in bytes, as DCP writes ``state``: every item through
    ``torch.save`` (tensors by their data plus the measured overhead, other values serialised
    here: they are a few numbers), and an index entry per item (its names three times and about
    200 bytes of pickled metadata)."""
    data = index = 0
    for fqn, v in _dcp_items(state):
        if isinstance(v, torch.Tensor):
            data += v.numel() * v.element_size() + _torch_save_overhead(v.dtype, v.dim())
        else:
            buf = io.BytesIO()
            torch.save(v, buf)
            data += len(buf.getvalue())
        index += 3 * len(fqn) + 200
    return data, index + 1024


def export_bytes(model, tokenizer) -> list[int]:
    """The sizes of what ``export_pretrained`` writes: its directory, model.safetensors (the state
    dict's tensors, tied ones once, and a JSON header entry per name), config.json,
    generation_config.json and the tokenizer's files (its tokenizer.json, chat template and
    configs)."""
    seen, weights, header = set(), 0, 8 + 64
    for name, t in model.state_dict().items():
        header += len(name) + 100
        local = t.to_local() if hasattr(t, "to_local") else t  # (a sharded model's DTensor)
        key = (local.data_ptr(), t.numel(), t.dtype)  # tied weights share their data
        if key not in seen:
            seen.add(key)
            weights += t.numel() * t.element_size()
    sizes = [_DIRECTORY, weights + header, len(model.config.to_json_string()) + 64]
    if getattr(model, "generation_config", None) is not None:
        sizes.append(len(model.generation_config.to_json_string()) + 64)
    return sizes + tokenizer_bytes(tokenizer)


def tokenizer_bytes(tokenizer) -> list[int]:
    """The sizes of the files ``tokenizer.save_pretrained`` writes: its tokenizer.json, chat
    template and configs."""
    sizes = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        sizes.append(int(len(backend.to_str(pretty=True).encode()) * 1.05))
    template = getattr(tokenizer, "chat_template", None)
    return sizes + [len(template.encode()) if isinstance(template, str) else 0, 4096, 4096]


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
    free = free_bytes(where)
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
def single_process_quiet():
    """DCP warns that it "assumes the intent" of a single process; it is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state(model, optimizer, trainable_only: bool) -> tuple[dict, dict, StateDictOptions]:
    """(model state, optimizer state, the options to load them back with). ``trainable_only``
    (LoRA): the frozen base comes from model.path (or the seed) again, so only the parameters
    that train are kept (a tied embedding that torch's ``ignore_frozen_params`` still lists under
    the head's name included)."""
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    if trainable_only:
        trains = {name for name, p in model.named_parameters(remove_duplicate=False)
                  if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trains}
    return model_sd, optim_sd, options


def save_checkpoint(run_dir: str, step: int, model, optimizer, scheduler, extra: dict,
                    keep: int = 2, also=None, also_sizes: Sequence[int] = (),
                    trainable_only: bool = False) -> str:
    """A collective under torchrun: every rank calls it with its (sharded) model and optimizer.
    ``also(tmp_dir)``, called on every rank before the rename, writes more into the checkpoint:
    files of about ``also_sizes`` bytes, for the free-space check. ``trainable_only``: the
    parameters that train (LoRA's adapters), not the frozen ones."""
    root = os.path.join(run_dir, CKPT_DIR)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = os.path.join(root, f".tmp_step_{step:06d}")
    model_sd, optim_sd, _ = _state(model, optimizer, trainable_only)
    world = dist.get_world_size() if _distributed() else 1
    texts = {}
    if _main():
        texts = {"train_state.json": _json_text({"scheduler": scheduler.state_dict(),
                                                 "rng": _rng_state()}),
                 "trainer_state.json": _json_text({"step": step, "world_size": world, **extra})}
    shard, index = dcp_bytes({"model": model_sd, "optim": optim_sd})
    sizes = [_DIRECTORY, *[shard] * world, index, *(len(t.encode()) for t in texts.values()),
             *also_sizes]
    previous = list_checkpoints(run_dir)
    kept = (f"the previous checkpoint {previous[-1]} is intact" if previous
            else "no checkpoint was written")
    problem = None
    need = on_disk(sizes, _block_size(run_dir))
    if _main():
        os.makedirs(root, exist_ok=True)
        free = free_bytes(root)
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
        with single_process_quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp,
                     no_dist=not _distributed())
        for name, text in texts.items():
            _write_text(os.path.join(tmp, name), text)
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


def _json_text(obj) -> str:
    return json.dumps(obj, indent=1)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    steps = sorted((int(d[5:]), d) for d in os.listdir(root) if re.fullmatch(r"step_\d+", d))
    return [os.path.join(root, d) for _, d in steps]


def _read_json(path: str) -> dict:
    name = os.path.basename(path)
    try:
        obj = read_json(path, f"polyfast's {name}")
    except DataError as e:
        raise CheckpointUnreadable(f"{name}: {e.message}") from None
    if not isinstance(obj, dict):
        raise CheckpointUnreadable(f"{name} does not hold an object")
    return obj


def trainer_state(path: str) -> dict:
    """A checkpoint's trainer_state.json: step, total steps, the world size that wrote it, the
    run identity. Raises CheckpointUnreadable."""
    state = _read_json(os.path.join(path, "trainer_state.json"))
    if not isinstance(state.get("step"), int):
        raise CheckpointUnreadable("trainer_state.json has no integer 'step'")
    return state


def load_dcp(path: str, state: dict) -> None:
    """Load the DCP checkpoint in ``path`` into ``state`` in place, its index decoded by
    dcp_metadata and its non-tensor values with ``weights_only``. A collective under torchrun.
    Raises CheckpointUnreadable."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointUnreadable("DCP's .metadata is missing")
    try:
        metadata = read_metadata(path)
    except (MetadataRefused, OSError) as e:
        raise CheckpointUnreadable(str(e)) from None
    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=_SafeReader(path, metadata), planner=_SafePlanner(),
                     no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # any failure to read is this checkpoint's
        raise CheckpointUnreadable(f"its tensors do not load ({_reason(e)})") from e


def load_checkpoint(path: str, model, optimizer, scheduler, trainable_only: bool = False) -> dict:
    """Restore model, optimizer, scheduler and RNG (into whatever sharding ``model`` has now);
    return trainer_state.json. A collective under torchrun. Raises CheckpointUnreadable (nothing
    but the model's and optimizer's tensors is touched before everything has been read).
    ``trainable_only`` as in ``save_checkpoint``."""
    state_json = trainer_state(path)
    if (not os.path.exists(os.path.join(path, "train_state.json"))
            and os.path.exists(os.path.join(path, "train_state.pt"))):
        raise CheckpointUnreadable("it holds a pickled train_state.pt (an older polyfast's format), "
                                   "which polyfast does not load: unpickling can run code")
    train_state = _read_json(os.path.join(path, "train_state.json"))
    model_sd, optim_sd, options = _state(model, optimizer, trainable_only)
    state = {"model": model_sd, "optim": optim_sd}
    load_dcp(path, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=options)
    try:
        scheduler.load_state_dict(train_state["scheduler"])
        _set_rng_state(train_state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointUnreadable(f"train_state.json does not restore ({e!r})") from e
    return state_json


def export_pretrained(model, tokenizer, out_dir: str) -> str:
    """save_pretrained + tokenizer, atomically, in a layout transformers and vLLM load as is."""
    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return _atomic_export(out_dir, export_bytes(model, tokenizer), write)


def lora_export_bytes(model, tokenizer, mode: str, base: str | None) -> list[int]:
    """The sizes of what ``export_lora`` writes: the adapter (its weights, config and the
    tokenizer), a tiny model's base, the merged model."""
    sizes = []
    if mode in ("adapter", "both"):  # adapter weights (+ header), adapter_config.json, tokenizer
        sizes += [_DIRECTORY, lora.adapter_bytes(model) + 64 * 1024, 4096, *tokenizer_bytes(tokenizer)]
        if base is None:
            sizes += export_bytes(model, tokenizer)
    if mode in ("merged", "both"):
        sizes += export_bytes(model, tokenizer)
    return sizes


def export_lora(model, tokenizer, out_dir: str, mode: str, base: str | None) -> str:
    """A LoRA-trained ``model`` exported as ``mode`` says (``polyfast.lora``): ``adapter`` (the
    peft adapter and tokenizer; with no ``base`` directory, the tiny model's base weights in
    ``base/`` beside it), ``merged`` (a plain model), ``both`` (the adapter, and ``merged/``);
    atomically, like ``export_pretrained``."""
    def write(tmp):
        if mode in ("adapter", "both"):
            if base is None:
                lora.plain_model(model, merge=False).save_pretrained(
                    os.path.join(tmp, lora.BASE_DIR), safe_serialization=True)
            lora.save_adapter(model, tmp, lora.BASE_DIR if base is None else os.path.abspath(base))
            tokenizer.save_pretrained(tmp)
        if mode in ("merged", "both"):
            where = tmp if mode == "merged" else os.path.join(tmp, lora.MERGED_DIR)
            lora.plain_model(model, merge=True).save_pretrained(where, safe_serialization=True)
            tokenizer.save_pretrained(where)
    return _atomic_export(out_dir, lora_export_bytes(model, tokenizer, mode, base), write)


def _atomic_export(out_dir: str, sizes: Sequence[int], write) -> str:
    """``write(tmp)`` into a temporary directory beside ``out_dir``, renamed into place when
    complete; refused before writing when ``sizes`` do not fit the free space."""
    tmp = out_dir.rstrip("/") + ".tmp"
    where = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(where, exist_ok=True)  # (its free space is asked for next)
    shutil.rmtree(tmp, ignore_errors=True)
    need = on_disk(sizes, _block_size(where))
    kept = (f"the previous export {out_dir} is intact" if os.path.exists(out_dir)
            else "nothing was exported")
    free = free_bytes(where)
    if free < need:
        raise _space_error(f"the export {out_dir}", where, need, free, kept)
    try:
        write(tmp)
    except Exception as e:
        _failed_write(e, f"the export {out_dir}", where, need, tmp, kept, "export")
        raise
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
