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


def knob(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):
    """A config field with its meaning beside it (``polyfast config show`` prints it): a default,
    or a ``factory`` of one for a nested config or a list."""
    return field(default=default, default_factory=factory, metadata={"help": help})
RUN_DIR_HELP = "the run's directory: config.yaml, metrics.jsonl, checkpoints/, final/"
FRACTION = Range(0, 1)


@dataclass
class TinyModelConfig:
    """A randomly initialised model built from a config (no download)."""
    arch: Literal["llama", "qwen2"] = knob("llama",
                                           "llama | qwen2: the transformers architecture of the "
                                           "tiny model")
    hidden_size: int = knob(128, "width of the residual stream")
    num_layers: int = knob(2, "decoder layers")
    num_heads: int = knob(4, "attention heads")
    num_kv_heads: int = knob(2,
                             "key/value heads (grouped-query attention when fewer than num_heads)")
    intermediate_size: int = knob(352, "width of the MLP")
    max_position_embeddings: int = knob(4096, "longest sequence RoPE is set up for")
    tie_word_embeddings: bool = knob(True, "the head shares the embedding matrix")
    vocab_size: int | None = knob(None,
                                  "null: the tokenizer's; larger gives a real model's head shape")

    LIMITS: ClassVar[dict] = {k: AT_LEAST_1 for k in (
        "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
        "max_position_embeddings", "vocab_size")}


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """Low-rank adapters on the trunk's linear layers (peft's LoRA): W x + (alpha / r) B A x."""
    r: int = knob(16, "rank of each adapter")
    alpha: float = knob(32.0, "scale numerator: the update is (alpha / r) B A")
    dropout: float = knob(0.0, "dropout on the adapters' input")
    target_modules: list[str] = knob(factory=lambda: list(LORA_TARGETS),
                                     help="the trunk's linear layers that get adapters, by name")
    export: Literal["adapter", "merged", "both"] = knob(
        "adapter",
        "final/: the peft adapter (small; its base stays where it is), merged (a plain model), "
        "or both (the adapter, and the merged model in final/merged)")

    LIMITS: ClassVar[dict] = {"r": AT_LEAST_1, "alpha": POSITIVE, "dropout": Range(0, 1, hi_open=True)}


@dataclass
class ModelConfig:
    path: str | None = knob(None,
                            "a local Hugging Face model directory (safetensors); null builds "
                            "model.tiny")
    tokenizer: str | None = knob(None,
                                 "a local tokenizer directory; null: model.path's, or the byte "
                                 "tokenizer of the tiny model")
    tiny: TinyModelConfig = knob(
        factory=TinyModelConfig, help="the randomly initialised model built when model.path is "
                                      "null")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = knob(
        "auto",
        "auto: fp32 weights and optimizer state, bf16 compute on CUDA; bfloat16 / float16: weights"
        " and optimizer state in that dtype (least memory)")
    activation_checkpointing: bool = knob(False,
                                          "recompute each decoder layer in the backward (less "
                                          "memory)")
    liger: bool | Literal["auto"] = knob(
        "auto", "Liger-Kernel's RMSNorm and SwiGLU/GEGLU modules (CUDA only); auto: the device's "
                "measured default (polyfast.model.AUTO_OPTIONS)")
    compile: bool | Literal["auto"] = knob(
        "auto", "torch.compile each decoder layer; auto: the device's measured default "
                "(polyfast.model.AUTO_OPTIONS)")
    trust_remote_code: bool = knob(False, "allow model code shipped with the checkpoint")
    lora: LoraConfig | None = knob(
        None,
        "LoRA adapters through peft, e.g. {r: 16, alpha: 32}: only the adapters train (HDPO's "
        "reference is the model with them switched off); null: full fine-tuning")


@dataclass
class DataConfig:
    train: str = knob("demo",
                      "TRAIN records: a .jsonl/.json file, a datasets directory, .parquet/.arrow, "
                      "hf:NAME[:SPLIT], or demo (the built-in records)")
    val: str | None = knob(None,
                           "held-out records for the per-bucket eval loss (same forms, demo: the "
                           "built-in ones); null: none")
    test: str | None = knob(None,
                            "test records (same forms); read by the evaluation, not by training")
    skip_bad_rows: bool = knob(False, "skip and count bad rows instead of stopping at the first")
    legacy_tokens: bool = knob(False,
                               "the released English data's token regex for derived length bins")
    system_prompt: Literal["profile", "record", "none"] = knob(
        "profile",
        "profile: the length/style profile prompt; record: the row's own system prompt; none")
    max_tokens: int = knob(2048, "pack capacity in tokens, and the longest example")
    packing: Literal["bucket", "mixed", "none"] = knob(
        "bucket",
        "bucket: packs of one bucket; mixed: any examples; none: padded batches")
    batch_size: int = knob(4, "examples per micro-batch with packing: none")
    overlong: Literal["truncate_left", "drop"] = knob(
        "truncate_left",
        "an example longer than max_tokens: cut its prompt from the left, or drop it")
    weighting: Literal["bucket", "example", "token"] = knob(
        "bucket",
        "bucket: w_b = N / (K n_b); example: every example alike; token: every token alike")
    weight_power: float = knob(1.0,
                               "bucket weights n_b^-power (1: the paper's inverse frequency, 0: "
                               "none)")
    weight_clip: float | None = knob(None, "cap on the bucket weights; null: no cap")

    LIMITS: ClassVar[dict] = {"max_tokens": Range(2), "batch_size": AT_LEAST_1,
                              "weight_power": NON_NEGATIVE, "weight_clip": POSITIVE}


@dataclass
class TrainConfig:
    epochs: float = knob(1.0, "passes over the training packs (fractions allowed)")
    max_steps: int | None = knob(None, "optimizer steps; null: from epochs")
    grad_accum: int = knob(1, "micro-batches (packs) per optimizer step")
    lr: float = knob(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = knob(0.1, "the cosine schedule ends at lr * min_lr_ratio")
    warmup_ratio: float = knob(0.05, "share of the steps spent in linear warm-up")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    betas: tuple[float, float] = knob((0.9, 0.95), "AdamW betas")
    grad_clip: float | None = knob(1.0, "gradient norm clip; null: none")
    loss_backend: Literal["auto", "triton", "gemm", "torch", "reference"] = knob(
        "auto",
        "the loss head: auto (torch on a CPU, on CUDA the fused kernel its cost model picks), "
        "triton, gemm, torch (chunked), reference (full logits)")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    tf32: bool = knob(False, "fp32 CUDA matmuls on TF32 tensor cores (for model.dtype float32)")
    num_threads: int | None = knob(None, "torch CPU threads; null: torch's default")
    log_every: int = knob(1, "steps between metrics rows (a row is written once the next step is "
                             "queued: logging does not stall the device)")
    eval_every: int = knob(0, "steps between evaluations; 0: before and after training only")
    save_every: int = knob(0, "steps between checkpoints; 0: only the final export")
    keep_checkpoints: int = knob(2, "checkpoints kept in run_dir/checkpoints (older ones deleted)")
    checkpoint_hf: bool = knob(True, "each checkpoint also holds hf/, a save_pretrained export")
    resume: bool = knob(False, "continue from run_dir's latest checkpoint")
    overwrite: bool = knob(False, "replace a run already in run_dir (--overwrite)")
    nonfinite: Literal["stop", "skip"] = knob("stop",
                                              "a step with a non-finite loss or gradient norm: "
                                              "stop, or skip its update")
    max_skipped_steps: int = knob(10,
                                  "with nonfinite: skip, stop after more skipped steps than this")
    progress: bool = knob(True, "progress bars")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = knob(
        factory=list,
        help="experiment trackers beside metrics.jsonl: tensorboard, wandb, mlflow, trackio "
             "(each pip install polyfast[NAME]); tensorboard writes under run_dir/tensorboard")
    run_name: str | None = knob(None, "the run's name in the trackers; null: run_dir's name")
    project: str = knob("polyfast",
                        "the trackers' project (wandb, trackio) or experiment (mlflow)")

    LIMITS: ClassVar[dict] = {
        "epochs": POSITIVE, "max_steps": AT_LEAST_1, "grad_accum": AT_LEAST_1, "lr": NON_NEGATIVE,
        "min_lr_ratio": FRACTION, "warmup_ratio": FRACTION, "weight_decay": NON_NEGATIVE,
        "betas": Range(0, 1, hi_open=True), "grad_clip": POSITIVE, "num_threads": AT_LEAST_1,
        "log_every": AT_LEAST_1, "eval_every": NON_NEGATIVE, "save_every": NON_NEGATIVE,
        "keep_checkpoints": NON_NEGATIVE, "max_skipped_steps": NON_NEGATIVE}


@dataclass
class SFTConfig:
    run_dir: str = knob("runs/sft", RUN_DIR_HELP)
    seed: int = knob(0, "seeds the model's initialisation and the data order")
    model: ModelConfig = knob(
        factory=ModelConfig, help="the model to train")
    data: DataConfig = knob(
        factory=DataConfig, help="records, buckets, packing and weighting")
    train: TrainConfig = knob(
        factory=TrainConfig, help="optimizer, schedule, logging and checkpoints")

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
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error, with its own key
            return _convert(value, options[0], key)
        errors = []
        for arg in options:
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
            raise ConfigError(key.strip(), f"the value {raw!r} is not valid YAML ({problem}); "
                              "quote a string, write a list as [a, b]") from None
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
    pairs: str = knob("",
                      "preference pairs: polyfast JSONL (polyfast pairs), the authors' HDPO "
                      "export, a datasets directory, .parquet/.arrow or hf:NAME[:SPLIT]")
    val_pairs: str | None = knob(None, "held-out pairs for reward accuracy and margin; null: none")
    skip_bad_rows: bool = knob(False, "skip and count bad rows instead of stopping at the first")
    legacy_tokens: bool = knob(False,
                               "the released English data's token regex for derived length bins")
    system_prompt: Literal["profile", "record", "none"] = knob(
        "profile",
        "profile | record | none, as data.system_prompt of SFT")
    max_tokens: int = knob(2048, "pack capacity; each side of a pair fits half of it")
    overlong: Literal["truncate_left", "drop"] = knob(
        "truncate_left",
        "a side longer than half a pack: cut the prompt from the left, or drop the pair")

    LIMITS: ClassVar[dict] = {"max_tokens": Range(4)}


@dataclass
class HDPOLossConfig:
    beta: float = knob(0.1, "DPO temperature on the policy/reference log-ratio")
    reg_lambda: float = knob(0.1, "weight of the critic-distance regulariser")
    ftx: float = knob(0.05, "weight of the anchor: the chosen side's mean NLL")
    label_smoothing: float = knob(0.0, "conservative DPO: share of the flipped-preference loss")
    distance: Literal["pairs", "feature", "lm", "none"] = knob(
        "pairs",
        "critic distances from the pair file (pairs), the text-feature band (feature), an LM "
        "critic's NLL band (lm), or none (DPO + anchor)")
    references: str | None = knob(None,
                                  "feature references JSON (polyfast critic references); null: "
                                  "built from the train pairs' human sides")
    band_floor: Literal["language", "authors"] = knob(
        "language",
        "scale floor of the band distance: language (a feature's spread over the language's human "
        "responses) or authors (1e-6, the released code's)")
    critic_model: str | None = knob(None,
                                    "the LM critic of distance: lm; null: model.path (the SFT "
                                    "checkpoint)")
    min_bucket_size: int = knob(20, "a bucket with fewer human responses uses its parent's band")
    reference: Literal["live", "precomputed"] = knob(
        "live",
        "live: the frozen reference model runs every step; precomputed: its log-probs are computed"
        " once and cached in run_dir")
    frozen: Literal["replicate", "shard"] = knob(
        "replicate",
        "under torchrun: frozen models replicated on every rank, or FSDP2-sharded")
    loss_backend: Literal["auto", "separate", "triton", "torch", "reference"] = knob(
        "auto",
        "auto, separate (one loss-head call per model), triton (one fused launch for all), torch, "
        "reference (full logits)")
    prefix_sharing: bool = knob(True,
                                "a group of pairs with one prompt holds the prompt once (same "
                                "numbers, less work)")

    LIMITS: ClassVar[dict] = {"beta": POSITIVE, "reg_lambda": NON_NEGATIVE, "ftx": NON_NEGATIVE,
                              "label_smoothing": Range(0, 0.5, hi_open=True),
                              "min_bucket_size": AT_LEAST_1}


def _hdpo_train_defaults() -> TrainConfig:
    return TrainConfig(lr=5e-7, warmup_ratio=0.1, min_lr_ratio=0.0, epochs=1.0)


@dataclass
class HDPOConfig:
    run_dir: str = knob("runs/hdpo", RUN_DIR_HELP)
    seed: int = knob(0, "seeds the data order")
    model: ModelConfig = knob(
        factory=ModelConfig, help="model.path: the Bucket-SFT export, the policy's start and "
                                  "the frozen reference")
    data: PairDataConfig = knob(
        factory=PairDataConfig, help="preference pairs and packing")
    hdpo: HDPOLossConfig = knob(
        factory=HDPOLossConfig, help="the HDPO loss and its critic")
    train: TrainConfig = knob(
        factory=_hdpo_train_defaults, help="optimizer, schedule, logging and checkpoints (HDPO "
                                           "defaults: lr 5e-7, warm-up 0.1, cosine to 0)")

    LIMITS: ClassVar[dict] = {"seed": NON_NEGATIVE}


CONFIGS = {"sft": SFTConfig, "hdpo": HDPOConfig}


def show_config(cls, cfg=None) -> str:
    """``cfg`` (default: the defaults of ``cls``) as YAML, every key with its help as a comment
    (what ``polyfast config show`` prints; it loads back to the same config)."""
    lines: list[str] = []

    def walk(obj, indent: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            note = f.metadata.get("help", "")
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
