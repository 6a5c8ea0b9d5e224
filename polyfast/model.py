"""Load a Hugging Face causal LM (local directory or a tiny config) and expose what the loss needs:
the trunk's hidden states (``model.model(...)``), the head weight and the final-logit softcap.

Files read from a model directory (``check_model_dir`` first, then transformers): ``config.json``
and ``generation_config.json`` (JSON), the weights as ``*.safetensors`` only (a directory with
pickled ``.bin`` weights alone is refused), and no model code unless ``model.trust_remote_code``
says so (transformers refuses an ``auto_map`` without it). The tokenizer: ``data.tokenize``."""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch

from . import attention
from .config import ModelConfig, TinyModelConfig
from .errors import ConfigError
from .phases import phase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device", f"{name!r} asked for, but no CUDA device is available")
    return torch.device(name)


def param_dtype(cfg: ModelConfig) -> torch.dtype:
    # "auto": fp32 parameters everywhere; CUDA runs the forward under bf16 autocast
    return torch.float32 if cfg.dtype == "auto" else DTYPES[cfg.dtype]


def autocast_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype | None:
    """The compute dtype training runs under autocast: bf16 for ``model.dtype: auto`` on CUDA
    (fp32 master weights, bf16 matmuls in the trunk and in the loss head), None elsewhere (the
    weights' dtype is the compute dtype)."""
    return torch.bfloat16 if cfg.dtype == "auto" and device.type == "cuda" else None


def autocast_context(cfg: ModelConfig, device: torch.device):
    """A fresh context manager for ``autocast_dtype`` (autocast objects must not be re-entered
    while active, so callers ask for a new one each time)."""
    dtype = autocast_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


# What ``model.liger`` and ``model.compile`` set to "auto" become, per device type. A CPU keeps
# what runs there: Liger's modules are CUDA kernels, and compiling every decoder layer costs more
# than the short runs a CPU does save. CUDA gets the fastest correct setting of bench.train's
# side-by-side modes on an H100 / H200 (sft:polyfast against sft:polyfast+liger and +compile,
# bench/RESULTS.md); until a GPU run has compared them, both stay off there too.
AUTO_OPTIONS = {"cpu": {"liger": False, "compile": False},
                "cuda": {"liger": False, "compile": False}}


def resolve_options(cfg: ModelConfig, device: torch.device | None, arch: str | None = None) -> dict:
    """{"liger": bool, "compile": bool} for ``cfg`` on ``device`` (None: the CPU): an explicit
    setting as given, "auto" from ``AUTO_OPTIONS``. "auto" never asks for what cannot run here:
    no Liger without liger-kernel or for an architecture ``arch`` it has no modules for."""
    kind = device.type if device is not None and device.type in AUTO_OPTIONS else "cpu"
    out = {}
    for key in ("liger", "compile"):
        value = getattr(cfg, key)
        out[key] = AUTO_OPTIONS[kind][key] if value == "auto" else value
    if cfg.liger == "auto" and out["liger"]:
        import importlib.util
        out["liger"] = (importlib.util.find_spec("liger_kernel") is not None
                        and (arch is None or arch in _LIGER))
    return out


def set_tf32(enabled: bool) -> None:
    """Let fp32 CUDA matmuls (the trunk's and the loss kernels') use TF32 tensor cores."""
    if not enabled:
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = True


def tiny_config(tiny: TinyModelConfig, tokenizer):
    """A transformers config of the tiny Llama- or Qwen2-shaped model for this tokenizer."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[tiny.arch]
    if tiny.hidden_size % tiny.num_heads or tiny.num_heads % tiny.num_kv_heads:
        raise ConfigError("model.tiny", "hidden_size must divide by num_heads, and num_heads by "
                          "num_kv_heads")
    vocab = tiny.vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ConfigError("model.tiny.vocab_size", f"{vocab} < the tokenizer's {len(tokenizer)} tokens")
    return cls(vocab_size=vocab, hidden_size=tiny.hidden_size,
               intermediate_size=tiny.intermediate_size, num_hidden_layers=tiny.num_layers,
               num_attention_heads=tiny.num_heads, num_key_value_heads=tiny.num_kv_heads,
               max_position_embeddings=tiny.max_position_embeddings,
               tie_word_embeddings=tiny.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def check_model_dir(path: str, key: str) -> None:
    """A local Hugging Face model directory with a config and whole safetensors weights: anything
    else is a ConfigError naming ``key`` and the file at fault (before transformers reads it)."""
    from safetensors import safe_open

    if not os.path.isdir(path):
        raise ConfigError(key, f"not a local model directory: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(key, f"{path} has no config.json: not a Hugging Face model directory")
    weights = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not weights:
        raise ConfigError(key, f"{path} has no .safetensors weights (polyfast loads only "
                          "safetensors: pickled .bin weights can run code)")
    for name in weights:
        try:  # reads the header, which must cover the whole file: truncation shows here
            with safe_open(os.path.join(path, name), "pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise ConfigError(key, f"{os.path.join(path, name)} is not a readable safetensors "
                              f"file ({e})") from None


def load_pretrained(path: str, key: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` from a checked local directory (safetensors only);
    a failure is a ConfigError naming ``key`` and the directory. A LoRA adapter directory (polyfast's
    ``model.lora.export: adapter``) is loaded onto its base and merged (``lora.load_adapter``)."""
    from transformers import AutoModelForCausalLM

    from . import lora
    if os.path.isdir(path) and lora.is_adapter_dir(path):
        return lora.load_adapter(path, key, load_pretrained, **kwargs)
    check_model_dir(path, key)
    try:
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ConfigError(key, f"transformers cannot load the model in {path}: {first}") from e


def load_model(cfg: ModelConfig, tokenizer, *, packed: bool = True, seed: int = 0,
               device: torch.device | None = None):
    """The causal LM: from ``cfg.path`` (safetensors only) or randomly initialised from ``cfg.tiny``,
    on ``device`` (default: left on the CPU), with the options of ``cfg`` applied ("auto" ones as
    ``resolve_options`` makes them for the device: Liger modules,
    LoRA adapters (``lora.add_adapters``: the model itself comes back, with peft's layers in it),
    activation checkpointing, compiled decoder layers).

    ``packed`` selects polyfast's varlen attention (packed batches); False selects SDPA with
    padding masks (the ``packing: none`` baseline and generation).
    """
    from transformers import AutoModelForCausalLM

    attn = attention.ATTN_IMPLEMENTATION if packed else "sdpa"
    dtype = param_dtype(cfg)
    if cfg.path:
        model = load_pretrained(cfg.path, "model.path", dtype=dtype, attn_implementation=attn,
                                trust_remote_code=cfg.trust_remote_code)
    else:
        torch.manual_seed(seed)
        # initialised where it will run: a GPU draws a 1.5B-parameter init in a second, a CPU not
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(tiny_config(cfg.tiny, tokenizer), dtype=dtype,
                                                     attn_implementation=attn)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ConfigError("model.tokenizer", f"the tokenizer has {len(tokenizer)} tokens, the model "
                          f"only {model.get_input_embeddings().weight.shape[0]} embeddings")
    options = resolve_options(cfg, device, model.config.model_type)
    if options["liger"]:
        if device is None or device.type != "cuda":
            raise ConfigError("model.liger", "Liger-Kernel's modules are Triton kernels for CUDA; "
                              f"this run is on {device or 'cpu'}")
        use_liger_modules(model)
    if cfg.lora is not None:  # adapters before the layers are wrapped or compiled
        from .lora import add_adapters
        torch.manual_seed(seed)  # A's random init: the same on every rank and every run
        add_adapters(model, cfg.lora)
    if device is not None:
        model = model.to(device)
    if cfg.activation_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if options["compile"]:
        for layer in model.model.layers:  # in place: names, parameters and hooks unchanged
            layer.compile()
    return model


# Liger-Kernel's modules for each architecture's RMSNorm and gated MLP: (norm kwargs, MLP class)
_LIGER = {
    "llama": ({"offset": 0.0, "casting_mode": "llama"}, "LigerSwiGLUMLP"),
    "qwen2": ({"offset": 0.0, "casting_mode": "llama"}, "LigerSwiGLUMLP"),
    "gemma2": ({"offset": 1.0, "casting_mode": "gemma", "in_place": False}, "LigerGEGLUMLP"),
}


def use_liger_modules(model) -> dict:
    """Replace every RMSNorm and gated MLP of ``model`` by Liger-Kernel's modules (its public
    classes), keeping the parameters: an instance-level swap, transformers' classes are untouched.

    RoPE stays transformers': Liger's RoPE can only be reached by rebinding a function inside
    transformers' modeling module, which polyfast does not do (``model.compile`` fuses it instead).
    Returns how many modules were replaced, by kind.
    """
    import liger_kernel.transformers as liger

    arch = model.config.model_type
    if arch not in _LIGER:
        raise ConfigError("model.liger", f"no Liger modules for {arch!r} (known: {', '.join(_LIGER)})")
    norm_kwargs, mlp_name = _LIGER[arch]
    act = getattr(model.config, "hidden_activation", None) or model.config.hidden_act
    if act not in ({"gelu_pytorch_tanh"} if arch == "gemma2" else {"silu", "swish"}):
        raise ConfigError("model.liger", f"Liger's gated MLP does not compute {act!r}")
    mlp_cls = getattr(liger, mlp_name)
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            kind = type(child).__name__
            if kind.endswith("RMSNorm"):
                eps = getattr(child, "variance_epsilon", None) or getattr(child, "eps")
                new = liger.LigerRMSNorm(child.weight.shape[0], eps=eps, **norm_kwargs)
                new.weight = child.weight
            elif kind.endswith("MLP") and hasattr(child, "gate_proj"):
                with torch.device("meta"):  # no fresh weights: the three projections move over
                    new = mlp_cls(model.config)
                new.gate_proj, new.up_proj, new.down_proj = (child.gate_proj, child.up_proj,
                                                             child.down_proj)
            else:
                continue
            swaps.append((parent, name, new, "rms_norm" if "Norm" in kind else "mlp"))
    for parent, name, new, _ in swaps:
        setattr(parent, name, new)
    return dict(Counter(kind for *_, kind in swaps))


def set_packed(model, packed: bool) -> None:
    """Switch between polyfast's packed attention and SDPA (for padded batches / generation)."""
    model.set_attn_implementation(attention.ATTN_IMPLEMENTATION if packed else "sdpa")


def head_weight(model) -> torch.Tensor:
    """The LM head weight (V, H) (the input embedding when tied)."""
    return model.get_output_embeddings().weight


def logit_softcap(model) -> float | None:
    """Gemma-2's final-logit softcapping, or None."""
    return getattr(model.config, "final_logit_softcapping", None) or None


class TrunkHead(torch.nn.Module):
    """Runs the trunk and hands (hidden states, head weight) to ``fn`` inside one forward, so that
    a sharded (FSDP2) policy has its embedding / head gathered while the loss kernel reads them.
    Unsharded, it is a plain call.

    ``autocast`` (a callable returning a context manager, e.g. ``autocast_context`` bound to a
    config) covers the trunk and ``fn`` alike: the loss kernels take their compute dtype from it
    (HF models hand out fp32 hidden states under autocast: residual stream and final norm stay
    fp32), so the head runs on the same 16-bit tensor cores as the trunk."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch, fn, autocast=None):
        with autocast() if autocast else contextlib.nullcontext():
            with phase("forward"):
                hidden = hidden_states(self.lm, batch)  # (B*T, H)
            with phase("loss_head"):
                return fn(hidden, head_weight(self.lm))


def hidden_states(model, batch) -> torch.Tensor:
    """The trunk's last hidden states of a batch, flattened: (B*T, H)."""
    out = model.model(**batch.model_inputs(), use_cache=False)
    h = out.last_hidden_state  # (B, T, H)
    return h.reshape(-1, h.shape[-1])
