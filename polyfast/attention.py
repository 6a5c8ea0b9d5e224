"""Packed (varlen) causal attention, registered with transformers' AttentionInterface.

A packed batch is one row of T tokens holding E examples back to back; ``cu_seqlens`` (E+1,) marks
their starts. Attention never crosses an example: each token sees only the earlier tokens of its own
example. transformers forwards ``cu_seq_lens_q/k`` and ``max_length_q/k`` from the model call to the
attention function; nothing in transformers is patched.

Backends, chosen per call:
- CUDA: flash-attn's ``flash_attn_varlen_func`` when installed, else
  ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9), in the autocast dtype under autocast
  (16-bit only; a head dimension that is not a multiple of 8 is zero-padded to one); fp32
  attention (``model.dtype: float32``), a head dimension over 256, softcapping or a backend that
  lacks a feature falls back to the per-example loop below.
- CPU (and fallback): a loop over examples with ``scaled_dot_product_attention`` (is_causal), or an
  explicit softmax when the model uses attention-logit softcapping (Gemma-2) or a sliding window.

transformers builds no mask for an attention function it does not know, so ``attention_mask`` is
always None here; a batch of several rows is attended row by row, causally (right padding is then
harmless: real tokens never see the pads after them).

Shapes: query (B, Hq, T, D), key/value (B, Hkv, T, D); returns (B, T, Hq, D) as transformers expects.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "polyfast_varlen"

try:  # optional: only builds against CUDA
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_varlen = None

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen
    _TORCH_VARLEN_PARAMS = set(inspect.signature(_torch_varlen).parameters)
except Exception:  # noqa: BLE001
    _torch_varlen, _TORCH_VARLEN_PARAMS = None, set()


def _repeat_kv(x: torch.Tensor, groups: int, head_dim: int = 1) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=head_dim)


def _explicit_causal(q, k, v, scale, softcap, window):
    # q: (Hq, L, D), k/v: (Hq, L, D) -> (Hq, L, D); softmax in fp32
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (Hq, L, L)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    L = q.shape[-2]
    i = torch.arange(L, device=q.device)
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


def _loop_attention(q, k, v, cu, scale, softcap, window):
    # q: (Hq, T, D), k/v: (Hq, T, D) (kv already repeated); cu: list of example starts + T
    out = torch.empty_like(q)
    for s, e in zip(cu[:-1], cu[1:]):
        qs, ks, vs = q[:, s:e], k[:, s:e], v[:, s:e]
        if softcap or window:
            out[:, s:e] = _explicit_causal(qs, ks, vs, scale, softcap, window)
        else:  # 4-D inputs: the CPU flash kernel takes only those (3-D falls back to the math path)
            out[:, s:e] = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True,
                                                         scale=scale)[0]
    return out


def varlen_kernel_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the CUDA varlen kernels take these (T, H, D) inputs: one 16-bit dtype, and a head
    dimension FlashAttention supports once padded to a multiple of 8 (at most 256)."""
    D = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
            and _padded_head_dim(D) <= 256 and k.shape[-1] == D == v.shape[-1])


def _padded_head_dim(D: int) -> int:
    return -(-D // 8) * 8


def _pad_head_dim(x: torch.Tensor) -> torch.Tensor:
    # zeros on the right of the head dimension: q.k and the softmax (with an explicit scale) are
    # unchanged, and the output's extra columns (zero weights of v) are cut off after
    D = x.shape[-1]
    return x if D % 8 == 0 else F.pad(x, (0, _padded_head_dim(D) - D))


def _cuda_varlen(q, k, v, cu, max_len, scale, softcap, window, groups):
    # q: (T, Hq, D), k/v: (T, Hkv, D) -> (T, Hq, D), or None when no CUDA backend fits
    if _flash_varlen is not None:
        kwargs = dict(softmax_scale=scale, causal=True)
        if window:
            kwargs["window_size"] = (window - 1, 0)
        if softcap:
            kwargs["softcap"] = softcap
        return _flash_varlen(q, k, v, cu, cu, max_len, max_len, **kwargs)
    if _torch_varlen is None or softcap:
        return None
    kwargs = {"scale": scale}
    if "window_size" in _TORCH_VARLEN_PARAMS:
        kwargs["window_size"] = (window - 1 if window else -1, 0)
    elif window:
        return None
    else:
        kwargs["is_causal"] = True
    if groups > 1:
        if "enable_gqa" in _TORCH_VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    return _torch_varlen(q, k, v, cu, cu, max_len, max_len, **kwargs)


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The function transformers calls in every attention layer (see the module docstring)."""
    if dropout:
        raise ValueError(f"{ATTN_IMPLEMENTATION} does not support attention dropout")
    B, Hq, T, D = query.shape
    groups = Hq // key.shape[1]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(D)
    softcap = kwargs.get("softcap") or None
    window = kwargs.get("sliding_window") or None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # an unpacked batch: each row is one causal sequence
        if B != 1:
            q, k, v = query, _repeat_kv(key, groups), _repeat_kv(value, groups)
            out = torch.stack([_loop_attention(q[b], k[b], v[b], [0, T], scale, softcap, window)
                               for b in range(B)])
            return out.transpose(1, 2).contiguous(), None
        cu = torch.tensor([0, T], dtype=torch.int32, device=query.device)
        max_len = T
    else:
        if B != 1:
            raise ValueError(f"packed batches have one row, got batch size {B}")
        max_len = int(kwargs.get("max_length_q") or T)
    if query.is_cuda:
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
        if torch.is_autocast_enabled("cuda"):
            # the projections ran in the autocast dtype, but RoPE multiplies q and k by fp32
            # cos / sin (HF computes them in the fp32 hidden states' dtype): the varlen kernels,
            # like SDPA under autocast, take the autocast dtype
            dtype = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if varlen_kernel_fits(q, k, v):
            out = _cuda_varlen(_pad_head_dim(q), _pad_head_dim(k), _pad_head_dim(v),
                               cu.to(torch.int32), max_len, scale, softcap, window, groups)
            if out is not None:
                return out[..., :D].unsqueeze(0), None  # (1, T, Hq, D)
    starts = cu.tolist()  # CPU path: one host sync per layer, fine on a CPU
    out = _loop_attention(query[0], _repeat_kv(key[0], groups, 0), _repeat_kv(value[0], groups, 0),
                          starts, scale, softcap, window)  # (Hq, T, D)
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
