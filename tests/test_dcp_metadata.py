"""DCP's checkpoint index is decoded without running code from it (polyfast.train.dcp_metadata).

Every payload below is first shown to be live: Python's own unpickler, given the same bytes,
creates the marker directory (or changes the class) the payload aims at. polyfast's reader must
refuse it with an error naming the checkpoint's file, and the marker must not exist afterwards.
Real indexes written by torch 2.11 and 2.13 (tests/data/dcp, made by make_dcp_fixture.py) load.
"""

import copyreg
import functools
import importlib
import importlib.util
import os
import pathlib
import pickle
import struct
import subprocess
import types
import warnings

import pytest
import torch

from polyfast.train import checkpoint as ckpt_mod
from polyfast.train.dcp_metadata import ALLOWED_GLOBALS, MetadataRefused, read_metadata

DATA = pathlib.Path(__file__).parent / "data"
P = pickle  # opcode constants


def _str(s: str) -> bytes:
    b = s.encode()
    return P.BINUNICODE + struct.pack("<I", len(b)) + b


def _global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + P.STACK_GLOBAL


def _proto(body: bytes, protocol: int = 4) -> bytes:
    return P.PROTO + bytes([protocol]) + body + P.STOP


def _mkdir_call(marker, fetch: bytes) -> bytes:
    """``fetch`` (which pushes a callable) called on (marker,)."""
    return _proto(fetch + _str(str(marker)) + P.TUPLE1 + P.REDUCE)


class _Mkdir:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


_TARGETS = {"os.mkdir": os.mkdir, "subprocess.Popen": subprocess.Popen}


@functools.cache
def _path_to(module: str, target: str):
    """A dotted name under ``module`` that reaches ``target`` through the modules it imports (what
    protocol 4's STACK_GLOBAL resolves for Python's unpickler), or None."""
    frontier, seen = [(importlib.import_module(module), "")], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's deprecated module attributes
        for _ in range(5):
            deeper = []
            for obj, prefix in frontier:
                for key, value in sorted(vars(obj).items()):
                    if value is _TARGETS[target]:
                        return f"{prefix}{key}"
                    if isinstance(value, types.ModuleType) and id(value) not in seen:
                        seen.add(id(value))
                        deeper.append((value, f"{prefix}{key}."))
            frontier = deeper
    return None


def _make_marker(marker, fetch: bytes, target: str) -> bytes:
    """``fetch`` (which pushes os.mkdir or subprocess.Popen) called to create ``marker``."""
    if target == "os.mkdir":
        return _mkdir_call(marker, fetch)
    argv = P.EMPTY_LIST + P.MARK + _str("mkdir") + _str(str(marker)) + P.APPENDS
    return _proto(fetch + argv + P.TUPLE1 + P.REDUCE)


@pytest.fixture
def ckpt(tmp_path):
    """An empty checkpoint directory and a marker path inside tmp_path."""
    d = tmp_path / "step_000007"
    d.mkdir()
    return d, tmp_path / "payload_ran"


def _plant(ckpt_dir, data: bytes) -> None:
    (ckpt_dir / ".metadata").write_bytes(data)


def _assert_live(build, tmp_path):
    """Python's unpickler runs the payload ``build(marker)`` makes: the marker appears."""
    live = tmp_path / "live_marker"
    result = pickle.loads(build(live))
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert live.exists(), "the payload is not live"
    os.rmdir(live)


def _assert_refused(ckpt_dir, marker, *words):
    with pytest.raises(MetadataRefused) as e:
        read_metadata(str(ckpt_dir))
    assert not marker.exists(), "a payload ran"
    assert str(ckpt_dir / ".metadata") in str(e.value)
    for w in words:
        assert w in str(e.value)
    return str(e.value)


# -- fetching a global ---------------------------------------------------------------------------


def test_a_plain_global_is_refused(ckpt, tmp_path):
    d, marker = ckpt
    def build(m):
        return _mkdir_call(m, _global("os", "mkdir"))
    _assert_live(build, tmp_path)
    _plant(d, build(marker))
    _assert_refused(d, marker, "refusing to build os.mkdir")


@pytest.mark.parametrize("target", sorted(_TARGETS))
@pytest.mark.parametrize("module", sorted({m for m, _ in ALLOWED_GLOBALS}))
def test_dotted_names_through_every_allowed_module_are_refused(ckpt, tmp_path, module, target):
    d, marker = ckpt
    dotted = _path_to(module, target)

    def build(m):
        return _make_marker(m, _global(module, dotted or target), target)
    if dotted is not None:  # the module does reach the target: the payload is live
        _assert_live(build, tmp_path)
    _plant(d, build(marker))
    _assert_refused(d, marker, "refusing to build", dotted or target)


def test_dotted_names_reach_the_targets_from_the_allowed_modules():
    # the check above is only as strong as its payloads: they must be live where it matters
    assert _path_to("torch.distributed.checkpoint.metadata", "subprocess.Popen")
    for module in ("torch", "pathlib", "torch.distributed.checkpoint.metadata",
                   "torch.serialization", "torch.distributed.checkpoint.filesystem"):
        assert _path_to(module, "os.mkdir"), module


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_payloads_in_every_protocol_are_refused(ckpt, tmp_path, protocol):
    d, marker = ckpt
    def build(m):
        return pickle.dumps(_Mkdir(m), protocol=protocol)
    _assert_live(build, tmp_path)
    _plant(d, build(marker))
    msg = _assert_refused(d, marker)
    # protocols 0-3 name the global with GLOBAL (refused as an opcode), 4-5 with STACK_GLOBAL
    assert ("opcode" in msg) if protocol < 4 else ("refusing to build" in msg), msg


def test_global_opcode_is_refused_even_for_an_allowed_name(ckpt):
    d, marker = ckpt
    _plant(d, _proto(P.GLOBAL + b"torch\nSize\n" + P.EMPTY_TUPLE + P.REDUCE, 2))
    _assert_refused(d, marker, "opcode GLOBAL is not allowed")


def test_inst_and_obj_are_refused(ckpt, tmp_path):
    d, marker = ckpt
    def inst(m):
        return _proto(P.MARK + _str(str(m)) + P.INST + b"os\nmkdir\n")
    _assert_live(inst, tmp_path)
    _plant(d, inst(marker))
    _assert_refused(d, marker, "opcode INST is not allowed")

    def obj(m):
        return _proto(P.MARK + _global("os", "mkdir") + _str(str(m)) + P.OBJ)
    _assert_live(obj, tmp_path)
    _plant(d, obj(marker))
    _assert_refused(d, marker, "refusing to build os.mkdir")
    # OBJ itself, with an allowed class
    _plant(d, _proto(P.MARK + _global("torch", "Size") + P.EMPTY_LIST + P.OBJ))
    _assert_refused(d, marker, "opcode OBJ is not allowed")


@pytest.mark.parametrize("code", [7, 0x1234, 0x123456])  # EXT1, EXT2, EXT4
def test_extension_codes_are_refused(ckpt, tmp_path, code):
    d, marker = ckpt
    copyreg.add_extension("os", "mkdir", code)
    try:
        if code < 0x100:
            ext = P.EXT1 + bytes([code])
        elif code < 0x10000:
            ext = P.EXT2 + struct.pack("<H", code)
        else:
            ext = P.EXT4 + struct.pack("<i", code)
        _assert_live(lambda m: _mkdir_call(m, ext), tmp_path)
        _plant(d, _mkdir_call(marker, ext))
        _assert_refused(d, marker, "is not allowed")
    finally:
        copyreg.remove_extension("os", "mkdir", code)


def test_persistent_ids_are_refused(ckpt):
    d, marker = ckpt
    _plant(d, _proto(_str("os.mkdir") + P.BINPERSID))
    _assert_refused(d, marker, "opcode BINPERSID is not allowed")
    _plant(d, b"Pos.mkdir\n.")
    _assert_refused(d, marker, "opcode PERSID is not allowed")


# -- calling and building with what is allowed ---------------------------------------------------


def test_newobj_and_newobj_ex_are_restricted(ckpt):
    d, marker = ckpt
    md = "torch.distributed.checkpoint.metadata"
    _plant(d, _proto(_global("subprocess", "Popen") + _str("id") + P.TUPLE1 + P.NEWOBJ))
    _assert_refused(d, marker, "refusing to build subprocess.Popen")
    _plant(d, _proto(_global("torch", "Size") + P.EMPTY_TUPLE + P.NEWOBJ))  # not a dataclass
    _assert_refused(d, marker, "refusing NEWOBJ")
    _plant(d, _proto(_global(md, "StorageMeta") + _str("x") + P.TUPLE1 + P.NEWOBJ))  # arguments
    _assert_refused(d, marker, "refusing NEWOBJ")
    _plant(d, _proto(_global(md, "StorageMeta") + P.EMPTY_TUPLE + P.EMPTY_DICT + P.NEWOBJ_EX))
    _assert_refused(d, marker, "opcode NEWOBJ_EX is not allowed")


@pytest.mark.parametrize("module,name,args,word", [
    ("torch.serialization", "_get_layout", _str("torch.nonsense") + P.TUPLE1, "KeyError"),
    ("torch", "Size", _str("a") + P.TUPLE1 + P.TUPLE1, "TypeError"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", P.BININT1 + b"\x63"
     + P.TUPLE1, "ValueError"),
    # a dataclass is built by NEWOBJ + BUILD, never called
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo",
     _str("../../etc/passwd") + P.BININT1 + b"\x00" + P.BININT1 + b"\x10" + P.TUPLE3, "refusing"),
    # an allowed callable on an object that is not a plain value (here: a class)
    ("pathlib", "PosixPath", _global("torch", "Size") + P.TUPLE1, "refusing to call"),
])
def test_allowed_callables_with_hostile_arguments_are_refused(ckpt, module, name, args, word):
    d, marker = ckpt
    _plant(d, _proto(_global(module, name) + args + P.REDUCE))
    _assert_refused(d, marker, word)


def test_build_on_a_class_or_with_unknown_fields_is_refused(ckpt):
    d, marker = ckpt
    md = "torch.distributed.checkpoint.metadata"
    before = vars(pathlib.PosixPath).copy()
    # BUILD on the class object PosixPath with slot state: Python's unpickler sets the attribute
    # (a new attribute: had it been __fspath__, a regression would break pathlib for the session)
    hostile = (_global("pathlib", "PosixPath") + P.NONE + P.EMPTY_DICT + _str("touched_by_build")
               + _global("torch", "Size") + P.SETITEM + P.TUPLE2 + P.BUILD)
    live = pickle.loads(_proto(_global(__name__, "_VictimHolder") + P.NONE + P.EMPTY_DICT
                               + _str("touched") + P.NEWTRUE + P.SETITEM + P.TUPLE2 + P.BUILD))
    assert live is _VictimHolder and _VictimHolder.touched  # the opcode does reach a class
    _plant(d, _proto(hostile))
    _assert_refused(d, marker, "refusing BUILD on the class pathlib.PosixPath")
    assert vars(pathlib.PosixPath) == before

    # a key that is not a field (here __class__, which setattr would honour)
    new = _global(md, "StorageMeta") + P.EMPTY_TUPLE + P.NEWOBJ
    _plant(d, _proto(new + P.NONE + P.EMPTY_DICT + _str("__class__") + _global(md, "Metadata")
                     + P.SETITEM + P.TUPLE2 + P.BUILD))
    _assert_refused(d, marker, "'__class__' is not one of its fields")
    _plant(d, _proto(new + P.EMPTY_DICT + P.BININT1 + b"\x01" + P.NONE + P.SETITEM + P.BUILD))
    _assert_refused(d, marker, "not one of its fields")
    # TensorProperties decodes its own tuple: a class inside it is refused
    tp = _global(md, "TensorProperties") + P.EMPTY_TUPLE + P.NEWOBJ
    _plant(d, _proto(tp + P.MARK + _global("torch", "Size") + P.NONE + P.NEWFALSE + P.NONE
                     + P.NEWFALSE + P.TUPLE + P.BUILD))
    _assert_refused(d, marker, "refusing BUILD of TensorProperties")


class _VictimHolder:
    """A class of this test's own, to show that BUILD on a class mutates it under pickle."""


# -- what the index says ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.11.0", "2.13.0"])
def test_real_indexes_of_torch_2_11_and_2_13_load(version):
    spec = importlib.util.spec_from_file_location("make_dcp_fixture",
                                                  DATA / "make_dcp_fixture.py")
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    path = DATA / "dcp" / f"torch-{version}"
    md = read_metadata(str(path))
    assert {type(v).__name__ for v in md.storage_data.values()} == {"_StorageInfo"}

    want_model, want_opt = fixture.model_and_optimizer()  # the values the fixture holds
    model, opt = fixture.model_and_optimizer()
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    for t in list(model_sd.values()):
        t.zero_()
    opt.param_groups[0]["lr"] = 0.5
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    ckpt_mod.load_dcp(str(path), state)
    for name, want in want_model.state_dict().items():
        torch.testing.assert_close(state["model"][name], want, rtol=1e-6, atol=0)
    assert state["optim"]["param_groups"][0]["lr"] == 1e-2
    assert tuple(state["optim"]["param_groups"][0]["betas"]) == (0.8, 0.9)
    exp_avg = [s["exp_avg"] for s in state["optim"]["state"].values()]
    want_avg = [s["exp_avg"] for s in want_opt.state.values()]
    for got, want in zip(exp_avg, want_avg, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_storage_entries_must_stay_inside_the_checkpoint(ckpt):
    d, marker = ckpt
    md = read_metadata(str(DATA / "dcp" / "torch-2.13.0"))
    for bad, word in [("../../secret", "points at"), ("/etc/passwd", "points at"),
                      ("..", "points at")]:
        key, info = next(iter(md.storage_data.items()))
        md.storage_data[key] = type(info)(bad, info.offset, info.length)
        _plant(d, pickle.dumps(md, protocol=4))
        _assert_refused(d, marker, word, repr(bad))
    md = read_metadata(str(DATA / "dcp" / "torch-2.13.0"))
    key, info = next(iter(md.storage_data.items()))
    md.storage_data[key] = type(info)(info.relative_path, -1, info.length)
    _plant(d, pickle.dumps(md, protocol=4))
    _assert_refused(d, marker, "offset -1")
    md.storage_data[key] = type(info)(info.relative_path, 0, 4, ["zstd"])
    _plant(d, pickle.dumps(md, protocol=4))
    _assert_refused(d, marker, "transforms")
    _plant(d, pickle.dumps({"not": "metadata"}, protocol=4))
    _assert_refused(d, marker, "not DCP's Metadata")


def test_a_checkpoint_with_a_refused_index_names_itself(ckpt, tmp_path):
    d, marker = ckpt
    _plant(d, _mkdir_call(marker, _global("torch", "os.mkdir")))
    with pytest.raises(ckpt_mod.CheckpointUnreadable) as e:
        ckpt_mod.load_dcp(str(d), {})
    assert not marker.exists() and str(d) in str(e.value)
