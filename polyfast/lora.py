"""LoRA adapters through peft: the trunk's linear layers get low-rank updates, everything else is
frozen, and the fast path stays as it is (packed varlen attention, hidden states from the trunk into
polyfast's loss kernels; a frozen head gets no gradient work in the kernels).

    W x  ->  W x + (alpha / r) B A x        A (r, in), B (out, r); B starts at 0

The model polyfast trains is the transformers model itself, with peft's LoRA layers in place of
the targeted ``nn.Linear`` modules (``peft.get_peft_model``); the ``PeftModel`` around it is kept
here (``wrapper``) for what peft does best: switching the adapters off (HDPO's reference is the
same weights with the adapters off, ``adapters_off``) and writing the adapter.

Export (``model.lora.export``):

- ``adapter`` (default): ``final/`` is a peft adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``, and the tokenizer), megabytes instead of the model's gigabytes;
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "final")`` loads it.
  Its ``base_model_name_or_path`` is ``model.path``; a tiny model built from ``model.tiny`` has no
  base on disk, so its initial weights go to ``final/base/`` (named relative to the adapter).
- ``merged``: ``final/`` is a plain Hugging Face model with ``W + (alpha / r) B A`` folded in, for
  tools that do not read adapters.
- ``both``: the adapter in ``final/`` and the merged model in ``final/merged/``.

Every polyfast command that takes a model (``generate``, ``eval``, ``critic``, HDPO's
``model.path``) accepts either form: an adapter directory is loaded onto its base and merged
(``load_adapter``). An adapter's base may itself be an adapter (HDPO's LoRA adapters after a LoRA
SFT sit on the SFT model): polyfast follows the chain; with plain peft, merge the SFT adapter into
its base first and load the HDPO adapter onto that.

Files read back: ``adapter_config.json`` (JSON, through peft's config class after polyfast has read
and checked it), ``adapter_model.safetensors`` (safetensors; a pickled ``adapter_model.bin`` is
refused), the base directory (``model.check_model_dir``).
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref

import torch

from .config import LoraConfig
from .errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base"      # final/base: a tiny model's initial weights, the adapter's base
MERGED_DIR = "merged"  # final/merged with export: both

# model -> (its PeftModel, its LoRA layers), set by add_adapters
_WRAPPERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def linear_names(model) -> list[str]:
    """The names (last path component) of the trunk's linear layers: what ``target_modules``
    may hold."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.model.named_modules()
                   if isinstance(m, torch.nn.Linear)})


def check_targets(model, cfg: LoraConfig) -> None:
    """Every target is one of the trunk's linear layers (the head and the embeddings are
    polyfast's loss kernel's and the trunk's input: adapters there would be bypassed)."""
    if not cfg.target_modules:
        raise ConfigError("model.lora.target_modules", "is empty: name the layers to adapt, e.g. "
                          "[q_proj, v_proj]")
    have = linear_names(model)
    missing = [t for t in cfg.target_modules if t not in have]
    if missing:
        head = {"lm_head", "embed_tokens"} & set(missing)
        why = (f" ({', '.join(sorted(head))}: the loss head and the embeddings take no adapters "
               "in polyfast)" if head else "")
        raise ConfigError("model.lora.target_modules",
                          f"{', '.join(missing)} not among the model's linear layers{why}; "
                          f"it has: {', '.join(have)}")


def add_adapters(model, cfg: LoraConfig):
    """Put LoRA layers into ``model`` (in place) and freeze everything else; returns ``model``
    (``wrapper(model)`` gives its PeftModel)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_targets(model, cfg)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=list(cfg.target_modules), bias="none",
                              task_type="CAUSAL_LM")
    with _peft_quiet():
        wrapped = get_peft_model(model, peft_cfg)
    assert wrapped.get_base_model() is model
    _WRAPPERS[model] = wrapped, list(_lora_layers(model).values())
    return model


@contextlib.contextmanager
def _peft_quiet():
    """peft asks transformers for a name it deprecated (``is_gradient_checkpointing``): a warning
    on every wrap that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        yield


def wrapper(model):
    """The PeftModel around ``model``, or None for a model without adapters."""
    return _WRAPPERS.get(model, (None, None))[0]


@contextlib.contextmanager
def adapters_off(model):
    """``model`` computes with its adapters switched off (the base weights) inside the block.

    peft's own switch (``disable_adapter``) also flips the adapters' ``requires_grad``, which
    under FSDP2 mid-step loses gradients (HDPO runs the reference inside the policy's forward);
    so only the flag each LoRA layer's forward reads is set, and restored after."""
    layers = _WRAPPERS[model][1]  # (found once: HDPO switches them every pack)
    before = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was


def trainable_count(model) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -- state dicts ---------------------------------------------------------------------------


def _lora_layers(model) -> dict:
    from peft.tuners.lora import LoraLayer
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def plain_state_dict(model, merge: bool) -> dict:
    """``model``'s weights under a plain model's names (no ``base_layer``, no adapters): the base
    weights, or with ``merge`` the base weights plus each adapter's ``(alpha / r) B A``."""
    layers = _lora_layers(model)
    out = {}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            owner = key.rsplit(".", 1)[0]
            if merge and key.endswith(".weight") and owner in layers:
                layer = layers[owner]
                value = value + layer.get_delta_weight(layer.active_adapters[0]).to(value.dtype)
            out[key] = value.detach().cpu().contiguous()
    return out


def plain_model(model, merge: bool):
    """A new transformers model (on the CPU) holding ``plain_state_dict(model, merge)``, to save:
    built on the meta device and given those tensors (no random init of a model's worth of
    weights)."""
    from transformers import AutoModelForCausalLM

    sd = plain_state_dict(model, merge)
    dtype = next(iter(sd.values())).dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(sd, strict=False, assign=True)
    tied = {k for k in missing if getattr(model.config, "tie_word_embeddings", False)
            and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"plain model: missing {sorted(set(missing) - tied)[:5]}, unexpected "
                           f"{sorted(unexpected)[:5]}")
    if tied:
        plain.tie_weights()
    return plain


def adapter_bytes(model) -> int:
    """What ``adapter_model.safetensors`` holds: the adapters' weights."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n)


def save_adapter(model, out_dir: str, base: str) -> None:
    """The peft adapter of ``model`` into ``out_dir``, naming ``base`` as its base model."""
    wrapped = wrapper(model)
    for cfg in wrapped.peft_config.values():
        cfg.base_model_name_or_path = base
    # (save_embedding_layers=False: the embeddings never train here, and peft would otherwise
    # look the base's config up, on the Hub if it is not a local path)
    wrapped.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    # peft writes a model card README.md; the adapter needs only its config and weights
    card = os.path.join(out_dir, "README.md")
    if os.path.exists(card):
        os.remove(card)


# -- loading an adapter directory -----------------------------------------------------------


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(path: str, key: str) -> str:
    """The base model directory an adapter names (a relative name is taken from the adapter's
    directory), checked to be a local directory."""
    from .errors import DataError
    from .files import read_json

    try:
        cfg = read_json(os.path.join(path, ADAPTER_CONFIG), "a peft adapter config")
    except DataError as e:
        raise ConfigError(key, str(e)) from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ConfigError(key, f"{os.path.join(path, ADAPTER_CONFIG)} is not a LoRA adapter config "
                          f"(peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r})")
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        raise ConfigError(key, f"{path} has no {ADAPTER_WEIGHTS} (polyfast loads only safetensors: "
                          "a pickled adapter_model.bin can run code)")
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ConfigError(key, f"the adapter in {path} names no base model "
                          "(base_model_name_or_path)")
    full = base if os.path.isabs(base) else os.path.join(path, base)
    if not os.path.isdir(full):
        raise ConfigError(key, f"the adapter in {path} names the base model {base!r}, which is not a "
                          "local directory: edit base_model_name_or_path in its "
                          f"{ADAPTER_CONFIG}")
    return full


def load_adapter(path: str, key: str, load_base, **kwargs):
    """The model of an adapter directory: its base (``load_base(base_dir, key, **kwargs)``, which
    may itself follow an adapter) with the adapter merged in; a plain transformers model."""
    from peft import PeftModel

    base = load_base(adapter_base(path, key), key, **kwargs)
    try:
        with _peft_quiet():
            model = PeftModel.from_pretrained(base, path, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ConfigError(key, f"peft cannot load the adapter in {path} onto its base: {first}") from e
    return model.merge_and_unload()


def weight_files(path: str) -> list[str]:
    """The safetensors files a model directory's weights come from, following an adapter's base:
    what a cache of its outputs is keyed by."""
    out = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".safetensors")]
    if is_adapter_dir(path):
        out += weight_files(adapter_base(path, "model.path"))
    return out
