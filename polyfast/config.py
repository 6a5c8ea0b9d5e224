"""Configs: YAML files mapped onto typed dataclasses.

A config file is read with ``yaml.safe_load`` (plain values only: no Python tags), and so are
overrides. Unknown keys and values of the wrong type fail at load with the dotted key path
(``ConfigError: config key 'train.lr': expected a number, got 'fast'``), as do numbers outside a
key's range (each dataclass's ``LIMITS``) and non-finite floats. Command-line overrides are
``key.path=value`` with the value parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
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
RUN_DIR_HELP = "the run's directory: config.yaml, metrics.jsonl, checkpoints/, final/"
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
    vocab_size: int | None = None

    LIMITS: ClassVar[dict] = {k: AT_LEAST_1 for k in (
        "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
        "max_position_embeddings", "vocab_size")}
    HELP: ClassVar[dict] = {
        "arch": "llama | qwen2: the transformers architecture of the tiny model",
        "hidden_size": "width of the residual stream",
        "num_layers": "decoder layers",
        "num_heads": "attention heads",
        "num_kv_heads": "key/value heads (grouped-query attention when fewer than num_heads)",
        "intermediate_size": "width of the MLP",
        "max_position_embeddings": "longest sequence RoPE is set up for",
        "tie_word_embeddings": "the head shares the embedding matrix",
        "vocab_size": "null: the tokenizer's; larger gives a real model's head shape",
    }


@dataclass
class ModelConfig:
    path: str | None = None
    tokenizer: str | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    activation_checkpointing: bool = False
    liger: bool = False
    compile: bool = False
    trust_remote_code: bool = False

    HELP: ClassVar[dict] = {
        "path": "a local Hugging Face model directory (safetensors); null builds model.tiny",
        "tokenizer": "a local tokenizer directory; null: model.path's, or the byte tokenizer of "
                     "the tiny model",
        "tiny": "the randomly initialised model built when model.path is null",
        "dtype": "auto: fp32 weights and optimizer state, bf16 compute on CUDA; bfloat16 / "
                 "float16: weights and optimizer state in that dtype (least memory)",
        "activation_checkpointing": "recompute each decoder layer in the backward (less memory)",
        "liger": "Liger-Kernel's RMSNorm and SwiGLU/GEGLU modules (CUDA)",
        "compile": "torch.compile each decoder layer",
        "trust_remote_code": "allow model code shipped with the checkpoint",
    }


@dataclass
class DataConfig:
    train: str = "demo"
    val: str | None = None
    test: str | None = None
    skip_bad_rows: bool = False
    legacy_tokens: bool = False
    system_prompt: Literal["profile", "record", "none"] = "profile"
    max_tokens: int = 2048
    packing: Literal["bucket", "mixed", "none"] = "bucket"
    batch_size: int = 4
    overlong: Literal["truncate_left", "drop"] = "truncate_left"
    weighting: Literal["bucket", "example", "token"] = "bucket"
    weight_power: float = 1.0
    weight_clip: float | None = None

    LIMITS: ClassVar[dict] = {"max_tokens": Range(2), "batch_size": AT_LEAST_1,
                              "weight_power": NON_NEGATIVE, "weight_clip": POSITIVE}
    HELP: ClassVar[dict] = {
        "train": "TRAIN records: a .jsonl/.json file, a datasets directory, .parquet/.arrow, "
                 "hf:NAME[:SPLIT], or demo (the built-in records)",
        "val": "held-out records for the per-bucket eval loss (same forms, demo: the built-in "
               "ones); null: none",
        "test": "test records (same forms); read by the evaluation, not by training",
        "skip_bad_rows": "skip and count bad rows instead of stopping at the first",
        "legacy_tokens": "the released English data's token regex for derived length bins",
        "system_prompt": "profile: the length/style profile prompt; record: the row's own "
                         "system prompt; none",
        "max_tokens": "pack capacity in tokens, and the longest example",
        "packing": "bucket: packs of one bucket; mixed: any examples; none: padded batches",
        "batch_size": "examples per micro-batch with packing: none",
        "overlong": "an example longer than max_tokens: cut its prompt from the left, or drop it",
        "weighting": "bucket: w_b = N / (K n_b); example: every example alike; token: every "
                     "token alike",
        "weight_power": "bucket weights n_b^-power (1: the paper's inverse frequency, 0: none)",
        "weight_clip": "cap on the bucket weights; null: no cap",
    }


@dataclass
class TrainConfig:
    epochs: float = 1.0
    max_steps: int | None = None
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    loss_backend: Literal["auto", "triton", "gemm", "torch", "reference"] = "auto"
    device: str = "auto"
    tf32: bool = False
    num_threads: int | None = None
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    checkpoint_hf: bool = True
    resume: bool = False
    overwrite: bool = False
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 10
    progress: bool = True
    report_to: list[Literal["tensorboard"]] = field(default_factory=list)

    LIMITS: ClassVar[dict] = {
        "epochs": POSITIVE, "max_steps": AT_LEAST_1, "grad_accum": AT_LEAST_1, "lr": NON_NEGATIVE,
        "min_lr_ratio": FRACTION, "warmup_ratio": FRACTION, "weight_decay": NON_NEGATIVE,
        "betas": Range(0, 1, hi_open=True), "grad_clip": POSITIVE, "num_threads": AT_LEAST_1,
        "log_every": AT_LEAST_1, "eval_every": NON_NEGATIVE, "save_every": NON_NEGATIVE,
        "keep_checkpoints": NON_NEGATIVE, "max_skipped_steps": NON_NEGATIVE}
    HELP: ClassVar[dict] = {
        "epochs": "passes over the training packs (fractions allowed)",
        "max_steps": "optimizer steps; null: from epochs",
        "grad_accum": "micro-batches (packs) per optimizer step",
        "lr": "peak learning rate (AdamW)",
        "min_lr_ratio": "the cosine schedule ends at lr * min_lr_ratio",
        "warmup_ratio": "share of the steps spent in linear warm-up",
        "weight_decay": "AdamW weight decay",
        "betas": "AdamW betas",
        "grad_clip": "gradient norm clip; null: none",
        "loss_backend": "the loss head: auto (torch on a CPU, on CUDA the fused kernel its cost "
                        "model picks), triton, gemm, torch (chunked), reference (full logits)",
        "device": "auto | cpu | cuda | cuda:N",
        "tf32": "fp32 CUDA matmuls on TF32 tensor cores (for model.dtype float32)",
        "num_threads": "torch CPU threads; null: torch's default",
        "log_every": "steps between metrics rows (each one waits for the device)",
        "eval_every": "steps between evaluations; 0: before and after training only",
        "save_every": "steps between checkpoints; 0: only the final export",
        "keep_checkpoints": "checkpoints kept in run_dir/checkpoints (older ones deleted)",
        "checkpoint_hf": "each checkpoint also holds hf/, a save_pretrained export",
        "resume": "continue from run_dir's latest checkpoint",
        "overwrite": "replace a run already in run_dir (--overwrite)",
        "nonfinite": "a step with a non-finite loss or gradient norm: stop, or skip its update",
        "max_skipped_steps": "with nonfinite: skip, stop after more skipped steps than this",
        "progress": "progress bars",
        "report_to": "extra metric sinks beside metrics.jsonl: [tensorboard] (needs "
                     "pip install polyfast[tensorboard]); events under run_dir/tensorboard",
    }


@dataclass
class SFTConfig:
    run_dir: str = "runs/sft"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    LIMITS: ClassVar[dict] = {"seed": NON_NEGATIVE}
    HELP: ClassVar[dict] = {
        "run_dir": RUN_DIR_HELP,
        "seed": "seeds the model's initialisation and the data order",
        "model": "the model to train",
        "data": "records, buckets, packing and weighting",
        "train": "optimizer, schedule, logging and checkpoints",
    }


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
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(key, f"unknown key ({hint}known: {', '.join(sorted(names))})")
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
    pairs: str = ""
    val_pairs: str | None = None
    skip_bad_rows: bool = False
    legacy_tokens: bool = False
    system_prompt: Literal["profile", "record", "none"] = "profile"
    max_tokens: int = 2048
    overlong: Literal["truncate_left", "drop"] = "truncate_left"

    LIMITS: ClassVar[dict] = {"max_tokens": Range(4)}
    HELP: ClassVar[dict] = {
        "pairs": "preference pairs: polyfast JSONL (polyfast pairs), the authors' HDPO export, "
                 "a datasets directory, .parquet/.arrow or hf:NAME[:SPLIT]",
        "val_pairs": "held-out pairs for reward accuracy and margin; null: none",
        "skip_bad_rows": "skip and count bad rows instead of stopping at the first",
        "legacy_tokens": "the released English data's token regex for derived length bins",
        "system_prompt": "profile | record | none, as data.system_prompt of SFT",
        "max_tokens": "pack capacity; each side of a pair fits half of it",
        "overlong": "a side longer than half a pack: cut the prompt from the left, or drop the pair",
    }


@dataclass
class HDPOLossConfig:
    beta: float = 0.1
    reg_lambda: float = 0.1
    ftx: float = 0.05
    label_smoothing: float = 0.0
    distance: Literal["pairs", "feature", "lm", "none"] = "pairs"
    references: str | None = None
    band_floor: Literal["language", "authors"] = "language"
    critic_model: str | None = None
    min_bucket_size: int = 20
    reference: Literal["live", "precomputed"] = "live"
    frozen: Literal["replicate", "shard"] = "replicate"
    loss_backend: Literal["auto", "separate", "triton", "torch", "reference"] = "auto"
    prefix_sharing: bool = True

    LIMITS: ClassVar[dict] = {"beta": POSITIVE, "reg_lambda": NON_NEGATIVE, "ftx": NON_NEGATIVE,
                              "label_smoothing": Range(0, 0.5, hi_open=True),
                              "min_bucket_size": AT_LEAST_1}
    HELP: ClassVar[dict] = {
        "beta": "DPO temperature on the policy/reference log-ratio",
        "reg_lambda": "weight of the critic-distance regulariser",
        "ftx": "weight of the anchor: the chosen side's mean NLL",
        "label_smoothing": "conservative DPO: share of the flipped-preference loss",
        "distance": "critic distances from the pair file (pairs), the text-feature band "
                    "(feature), an LM critic's NLL band (lm), or none (DPO + anchor)",
        "references": "feature references JSON (polyfast critic references); null: built from "
                      "the train pairs' human sides",
        "band_floor": "scale floor of the band distance: language (a feature's spread over the "
                      "language's human responses) or authors (1e-6, the released code's)",
        "critic_model": "the LM critic of distance: lm; null: model.path (the SFT checkpoint)",
        "min_bucket_size": "a bucket with fewer human responses uses its parent's band",
        "reference": "live: the frozen reference model runs every step; precomputed: its "
                     "log-probs are computed once and cached in run_dir",
        "frozen": "under torchrun: frozen models replicated on every rank, or FSDP2-sharded",
        "loss_backend": "auto, separate (one loss-head call per model), triton (one fused launch "
                        "for all), torch, reference (full logits)",
        "prefix_sharing": "a group of pairs with one prompt holds the prompt once (same numbers, "
                          "less work)",
    }


def _hdpo_train_defaults() -> TrainConfig:
    return TrainConfig(lr=5e-7, warmup_ratio=0.1, min_lr_ratio=0.0, epochs=1.0)


@dataclass
class HDPOConfig:
    run_dir: str = "runs/hdpo"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    hdpo: HDPOLossConfig = field(default_factory=HDPOLossConfig)
    train: TrainConfig = field(default_factory=_hdpo_train_defaults)

    LIMITS: ClassVar[dict] = {"seed": NON_NEGATIVE}
    HELP: ClassVar[dict] = {
        "run_dir": RUN_DIR_HELP,
        "seed": "seeds the data order",
        "model": "model.path: the Bucket-SFT export, the policy's start and the frozen reference",
        "data": "preference pairs and packing",
        "hdpo": "the HDPO loss and its critic",
        "train": "optimizer, schedule, logging and checkpoints (HDPO defaults: lr 5e-7, "
                 "warm-up 0.1, cosine to 0)",
    }


CONFIGS = {"sft": SFTConfig, "hdpo": HDPOConfig}


def show_config(cls, cfg=None) -> str:
    """``cfg`` (default: the defaults of ``cls``) as YAML, every key with its help as a comment
    (what ``polyfast config show`` prints; it loads back to the same config)."""
    lines: list[str] = []

    def walk(obj, indent: str) -> None:
        helps = getattr(type(obj), "HELP", {})
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            note = helps.get(f.name, "")
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:" + (f"  # {note}" if note else ""))
                walk(value, indent + "  ")
                continue
            if isinstance(value, tuple):
                value = list(value)
            text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True,
                                  width=1000).strip().removesuffix("\n...").strip()
            entry = f"{indent}{f.name}: {text}"
            lines.append(f"{entry:<40}  # {note}" if note else entry)

    walk(cls() if cfg is None else cfg, "")
    return "\n".join(lines) + "\n"
