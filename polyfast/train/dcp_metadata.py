"""DCP's checkpoint index (``.metadata``, a pickle), read without running code from it.

torch.distributed.checkpoint writes a checkpoint's index with ``pickle.dump`` and reads it back with
``pickle.load``, which calls whatever the file names. polyfast reads it with ``read_metadata``
instead: an unpickler that interprets only the opcodes DCP's index uses and can build exactly

- pickle's own values: None, bools, ints, floats, str, bytes, tuples, lists, dicts, sets;
- the (module, name) pairs of ``ALLOWED_GLOBALS``, looked up here in a table built from this module's
  imports (a name is never resolved through the file's modules, so ``torch.os.system`` or any
  other dotted name is refused): DCP's metadata dataclasses and ``_StorageInfo``, its memory-format
  enum, ``torch.Size``, torch's dtypes, ``torch.serialization._get_layout``, pathlib's path
  classes and ``collections.OrderedDict``;
- with NEWOBJ, an empty instance of one of the dataclasses (no arguments); with BUILD, that
  instance's fields (keys must be field names; ``TensorProperties`` decodes its own 5-tuple);
  with REDUCE, a call of ``torch.Size``, the dtype/layout/enum decoders, a path class or
  OrderedDict on a tuple of plain values.

Every other opcode is refused: GLOBAL and the text opcodes of protocols 0 and 1, INST, OBJ,
NEWOBJ_EX, EXT1/EXT2/EXT4 (copyreg's registry), PERSID/BINPERSID. So is BUILD on anything but an
instance of the dataclasses (never on a class). The decoded index is then checked: a ``Metadata``
whose every storage entry is a file name inside the checkpoint directory (no path, no ``..``), at a
non-negative offset and length, with no transforms. A refusal raises ``MetadataRefused``, naming
the file and what was refused.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pathlib
import pickle
import pickletools

import torch
import torch.serialization
from torch.distributed.checkpoint import filesystem as _dcp_fs
from torch.distributed.checkpoint import metadata as _dcp_md


class MetadataRefused(Exception):
    """A ``.metadata`` file polyfast will not decode; ``str`` names the file and the reason."""


_MD = "torch.distributed.checkpoint.metadata"

# the dataclasses an index is made of: built empty by NEWOBJ, filled by BUILD
_DATACLASSES = {(_MD, n): getattr(_dcp_md, n) for n in (
    "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
    "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta")}
_DATACLASSES[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _dcp_fs._StorageInfo

# callables REDUCE may call, each on a tuple of plain values
_CALLABLES = {("torch", "Size"): torch.Size,
              ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
              (_MD, "_MEM_FORMAT_ENCODING"): _dcp_md._MEM_FORMAT_ENCODING,
              ("collections", "OrderedDict"): collections.OrderedDict,
              **{("pathlib", n): getattr(pathlib, n) for n in (
                  "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")}}

# plain objects named in the file: torch's dtypes (pickled as e.g. torch.float32)
_DTYPES = {("torch", n): getattr(torch, n) for n in dir(torch)
           if isinstance(getattr(torch, n, None), torch.dtype)}

ALLOWED_GLOBALS = {**_DATACLASSES, **_CALLABLES, **_DTYPES}
# what the calls and names above give, as TensorProperties' state may hold them
_DECODED = (torch.dtype, torch.layout, torch.Size, _dcp_md._MEM_FORMAT_ENCODING)
_BUILDABLE = frozenset(_DATACLASSES.values())
_CALLABLE_IDS = frozenset(id(f) for f in _CALLABLES.values())

# what an index needs: protocol 2+ framing, memo, binary scalars and containers, STACK_GLOBAL,
# NEWOBJ, REDUCE and BUILD (the last three checked below)
_ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
    "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND", "APPENDS",
    "EMPTY_DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET",
    "STACK_GLOBAL", "NEWOBJ", "REDUCE", "BUILD"})
_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


def _refuse(what: str):
    raise pickle.UnpicklingError(what)


class _Dispatch(dict):
    """The opcode table: a missing entry is a refused opcode."""

    def __missing__(self, code: int):
        _refuse(f"opcode {_OPCODE_NAMES.get(code, hex(code))} is not allowed")


class _IndexUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (so every opcode goes through the table below) with the globals,
    calls and builds restricted as the module docstring says."""

    def find_class(self, module: str, name: str):
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            _refuse(f"refusing to build {module}.{name}: not one of the names a DCP index holds")
        return obj

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls not in _BUILDABLE or args != ():
            _refuse(f"refusing NEWOBJ of {_describe(cls)} with {len(args)} argument(s)")
        self.append(cls.__new__(cls))

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in _CALLABLE_IDS or type(args) is not tuple:
            _refuse(f"refusing to call {_describe(func)}")
        for a in args:
            if not _plain(a):
                _refuse(f"refusing to call {_describe(func)} on a {type(a).__name__}")
        self.stack[-1] = func(*args)

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        if cls not in _BUILDABLE:  # also refuses every class object: type(cls) is type
            _refuse(f"refusing BUILD on {_describe(inst)}")
        if "__setstate__" in vars(cls):  # TensorProperties: its own decoder of a tuple of values
            if type(state) is not tuple or not all(_plain(v) or isinstance(v, _DECODED)
                                                   for v in state):
                _refuse(f"refusing BUILD of {cls.__name__} from a {type(state).__name__}")
            inst.__setstate__(state)
            return
        slots = None
        if type(state) is tuple and len(state) == 2:
            state, slots = state
        fields = {f.name for f in dataclasses.fields(cls)}
        for part in (state, slots):
            if part is None:
                continue
            if type(part) is not dict:
                _refuse(f"refusing BUILD of {cls.__name__} from a {type(part).__name__}")
            unknown = [k for k in part if type(k) is not str or k not in fields]
            if unknown:
                _refuse(f"refusing BUILD of {cls.__name__}: {unknown[0]!r} is not one of its fields")
            for k, v in part.items():
                object.__setattr__(inst, k, v)  # (MetadataIndex is frozen)

    dispatch = _Dispatch({code: fn for code, fn in pickle._Unpickler.dispatch.items()
                          if _OPCODE_NAMES.get(code) in _ALLOWED_OPCODES})
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build


def _describe(obj) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    name = getattr(obj, "__qualname__", None)
    if name is not None:
        return f"{getattr(obj, '__module__', '?')}.{name}"
    return f"a {type(obj).__name__}"


def _plain(v) -> bool:
    """A value pickle itself makes (no object of a class of ours, no class, no function)."""
    if v is None or type(v) in (bool, int, float, str, bytes):
        return True
    if type(v) in (tuple, list, frozenset, set):
        return all(_plain(x) for x in v)
    return False


def _check(md, where: str) -> None:
    """The decoded index is a Metadata whose storage entries stay inside the checkpoint."""
    if not isinstance(md, _dcp_md.Metadata):
        _refuse(f"it holds a {type(md).__name__}, not DCP's Metadata")
    if not isinstance(md.state_dict_metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, (_dcp_md.TensorStorageMetadata,
                                                  _dcp_md.BytesStorageMetadata))
            for k, v in md.state_dict_metadata.items()):
        _refuse("its state_dict_metadata is not a dict of DCP's storage metadata")
    if not isinstance(md.storage_data, dict):
        _refuse("its storage_data is not a dict")
    for key, info in md.storage_data.items():
        if not isinstance(key, _dcp_md.MetadataIndex) or not isinstance(info, _dcp_fs._StorageInfo):
            _refuse("its storage_data is not a dict of DCP's storage entries")
        path = info.relative_path
        if (not isinstance(path, str) or path in ("", ".", "..") or os.path.basename(path) != path
                or (os.altsep and os.altsep in path)):
            _refuse(f"storage entry {key.fqn!r} points at {path!r}, not a file of {where}")
        if not (type(info.offset) is int and type(info.length) is int
                and info.offset >= 0 and info.length >= 0):
            _refuse(f"storage entry {key.fqn!r} has offset {info.offset!r}, length {info.length!r}")
        if getattr(info, "transform_descriptors", None):
            _refuse(f"storage entry {key.fqn!r} asks for transforms "
                    f"{info.transform_descriptors!r}, which polyfast never writes")


def read_metadata(checkpoint_dir: str):
    """DCP's ``Metadata`` of ``checkpoint_dir`` (from its ``.metadata``), decoded as the module
    docstring says. Raises MetadataRefused naming the file, or OSError when it cannot be read."""
    path = os.path.join(checkpoint_dir, ".metadata")
    with open(path, "rb") as f:
        data = f.read()
    try:
        md = _IndexUnpickler(io.BytesIO(data)).load()
        _check(md, checkpoint_dir)
    except Exception as e:  # noqa: BLE001 - any failure to decode is this file's
        reason = str(e) if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {e}"
        raise MetadataRefused(f"{path}: {reason}") from None
    return md
