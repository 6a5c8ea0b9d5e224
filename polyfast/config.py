"""Configs: YAML files mapped onto typed dataclasses.

Unknown keys and values of the wrong type fail at load with the dotted key path
(``ConfigError: config key 'train.lr': expected a number, got 'fast'``), as do numbers outside a
key's range (each dataclass's ``LIMITS``) and non-finite floats. Command-line overrides are
``key.path=value`` with the value parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: ``lo`` / ``hi`` bounds (None: unbounded), each inclusive
    unless ``*_open``."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x) -> bool:
        return ((self.lo is None or (x > self.lo if self.lo_open else x >= self.lo))
                and (self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return (f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.hi_open else ']'}")


POSITIVE, NON_NEGATIVE, AT_LEAST_1 = Range(0, lo_open=True), Range(0), Range(1)
FRACTION = Range(0, 1)


@dataclass
class TinyModelConfig:
    """A randomly initialised model built from a config (no download)."""
    arch: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True
    vocab_size: int | None = None        # default: the tokenizer's (larger: a real model's shape)

    LIMITS: ClassVar[dict] = {k: AT_LEAST_1 for k in (
        "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
        "max_position_embeddings", "vocab_size")}


@dataclass
class ModelConfig:
    path: str | None = None              # local HF model directory; None builds `tiny`
    tokenizer: str | None = None         # local tokenizer dir; default: `path`, or "byte" for tiny
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    # auto: fp32 weights and optimizer state (the master copy); on CUDA the compute runs in bf16
    # (autocast in one process, FSDP2 bf16 parameters / fp32 gradient reduction under torchrun).
    # bfloat16 / float16: the weights and the optimizer state in that dtype (least memory).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    activation_checkpointing: bool = False   # recompute each decoder layer in the backward
    liger: bool = False                  # Liger-Kernel's RMSNorm and SwiGLU/GEGLU modules (CUDA)
    compile: bool = False                # torch.compile each decoder layer
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    train: str = "demo"                  # a file, or "demo" for the built-in records
    val: str | None = "demo"
    test: str | None = None
    skip_bad_rows: bool = False
    legacy_tokens: bool = False          # the authors' token regex for derived length bins
    system_prompt: Literal["profile", "record", "none"] = "profile"
    max_tokens: int = 2048               # pack capacity = longest example
    packing: Literal["bucket", "mixed", "none"] = "bucket"
    batch_size: int = 4                  # examples per micro-batch with packing: none
    overlong: Literal["truncate_left", "drop"] = "truncate_left"
    weighting: Literal["bucket", "example", "token"] = "bucket"
    weight_power: float = 1.0
    weight_clip: float | None = None

    LIMITS: ClassVar[dict] = {"max_tokens": Range(2), "batch_size": AT_LEAST_1,
                              "weight_power": NON_NEGATIVE, "weight_clip": POSITIVE}


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None
    grad_accum: int = 1                  # micro-batches (packs) per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    loss_backend: Literal["auto", "triton", "gemm", "torch", "reference"] = "auto"
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    tf32: bool = False                   # fp32 CUDA matmuls (trunk and loss head) on TF32 tensor
                                         # cores; for model.dtype float32 (auto/bf16 compute in bf16)
    num_threads: int | None = None       # torch CPU threads
    log_every: int = 1
    eval_every: int = 0                  # steps; 0 = before and after training only
    save_every: int = 0                  # steps; 0 = only the final export
    keep_checkpoints: int = 2
    checkpoint_hf: bool = True           # each checkpoint also holds hf/, a save_pretrained export
    resume: bool = False                 # continue from run_dir's latest checkpoint
    overwrite: bool = False              # replace a run already in run_dir (--overwrite)
    # a step whose loss or gradient norm is not finite: stop the run (no export), or skip its
    # update (its packs and its learning-rate step are spent) and stop after max_skipped_steps
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10
    progress: bool = True

    LIMITS: ClassVar[dict] = {
        "epochs": POSITIVE, "max_steps": AT_LEAST_1, "grad_accum": AT_LEAST_1, "lr": NON_NEGATIVE,
        "min_lr_ratio": FRACTION, "warmup_ratio": FRACTION, "weight_decay": NON_NEGATIVE,
        "betas": Range(0, 1, hi_open=True), "grad_clip": POSITIVE, "num_threads": AT_LEAST_1,
        "log_every": AT_LEAST_1, "eval_every": NON_NEGATIVE, "save_every": NON_NEGATIVE,
        "keep_checkpoints": NON_NEGATIVE, "max_skipped_steps": NON_NEGATIVE}


@dataclass
class SFTConfig:
    run_dir: str = "runs/sft"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    LIMITS: ClassVar[dict] = {"seed": NON_NEGATIVE}


# ---------------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(key, "; ".join(errors))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(key, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(key, f"unsupported type {_type_name(tp)}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            key = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(key, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    for k, limit in getattr(cls, "LIMITS", {}).items():
        values = kwargs.get(k)
        for v in values if isinstance(values, tuple) else (values,):
            if v is not None and v not in limit:
                raise ConfigError(f"{prefix}.{k}" if prefix else k, f"must be {limit}, got {v!r}")
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"'{p}' is not a mapping")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(key.strip(), f"the value {raw!r} is not valid YAML ({problem}); quote "
                              "a string, write a list as [a, b]") from None
        out.append((key.strip(), value))
    return out


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[str] = (),
                extra: dict | None = None):
    """Build ``cls`` from a YAML file (optional), a dict of defaults and ``key=value`` overrides."""
    tree: dict = {}
    if extra:
        for k, v in extra.items():
            _set_path(tree, k, v)
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ConfigError("<file>", f"config file not found: {path}" if not os.path.exists(path)
                              else f"{path} is not a file")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ConfigError("<file>", f"{path} is not UTF-8 text (line {line}, byte {e.start}: "
                              f"{e.reason})") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError("<file>", f"{path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError("<file>", f"{path} must hold a mapping at top level")
        tree = _merge(tree, loaded)
    for key, value in parse_overrides(list(overrides)):
        _set_path(tree, key, value)
    return _build(cls, tree)


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested mapping as {"dotted.key": value} (the inverse of the overrides' paths)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def to_dict(cfg) -> dict:
    def clean(x):
        if isinstance(x, tuple):
            return [clean(v) for v in x]
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return x
    return clean(dataclasses.asdict(cfg))


def save_config(cfg, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, allow_unicode=True)


@dataclass
class PairDataConfig:
    pairs: str = ""                      # a pairs file: polyfast JSONL or the authors' HDPO export
    val_pairs: str | None = None         # held-out pairs for reward accuracy / margin
    skip_bad_rows: bool = False
    legacy_tokens: bool = False
    system_prompt: Literal["profile", "record", "none"] = "profile"
    max_tokens: int = 2048               # pack capacity; a pair's two sides share a pack
    overlong: Literal["truncate_left", "drop"] = "truncate_left"

    LIMITS: ClassVar[dict] = {"max_tokens": Range(4)}


@dataclass
class HDPOLossConfig:
    beta: float = 0.1
    reg_lambda: float = 0.1
    ftx: float = 0.05
    label_smoothing: float = 0.0
    # where the critic distances come from: the pair file (offline), the text-feature band
    # distance, an LM critic's NLL band (online), or none (plain DPO + anchor)
    distance: Literal["pairs", "feature", "lm", "none"] = "pairs"
    references: str | None = None        # feature references JSON (default: from the train pairs)
    critic_model: str | None = None      # the LM critic (default: model.path, the SFT checkpoint)
    min_bucket_size: int = 20
    reference: Literal["live", "precomputed"] = "live"   # frozen reference in memory, or cached
    # under torchrun: each rank holds whole frozen models (replicate), or they are FSDP2-sharded
    # like the policy (shard: less memory, one all-gather per layer and forward)
    frozen: Literal["replicate", "shard"] = "replicate"
    loss_backend: Literal["auto", "separate", "triton", "torch", "reference"] = "auto"
    # pairs that share a prompt are laid out with the prompt once, [prompt | r_1 | r_2 ...], each
    # response attending to the prompt and itself: the same numbers as one copy per response
    prefix_sharing: bool = True

    LIMITS: ClassVar[dict] = {"beta": POSITIVE, "reg_lambda": NON_NEGATIVE, "ftx": NON_NEGATIVE,
                              "label_smoothing": Range(0, 0.5, hi_open=True),
                              "min_bucket_size": AT_LEAST_1}


def _hdpo_train_defaults() -> TrainConfig:
    return TrainConfig(lr=5e-7, warmup_ratio=0.1, min_lr_ratio=0.0, epochs=1.0)


@dataclass
class HDPOConfig:
    run_dir: str = "runs/hdpo"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)   # path: the Bucket-SFT checkpoint
    data: PairDataConfig = field(default_factory=PairDataConfig)
    hdpo: HDPOLossConfig = field(default_factory=HDPOLossConfig)
    train: TrainConfig = field(default_factory=_hdpo_train_defaults)

    LIMITS: ClassVar[dict] = {"seed": NON_NEGATIVE}
