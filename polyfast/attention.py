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

Prefix-shared preference groups (``polyfast.data.groups``) pass ``polyfast_kv_index``, the stream
positions of every query segment's keys (a shared prompt's in front of each response's own), with
the key segments in ``cu_seq_lens_k``; the causal mask aligns bottom-right (the last query of a
segment sees all its keys). On CUDA the keys and values are gathered and the varlen kernels take
cu_seqlens_q != cu_seqlens_k (both align that way); the CPU loop slices the prompt's keys from the
stream and runs SDPA with a bottom-right mask, or, for a response longer than its prompt, causal
SDPA over [prompt | response] with the prompt's rows dropped (cheaper than a mask's dense scores).

Shapes: query (B, Hq, T, D), key/value (B, Hkv, T, D); returns (B, T, Hq, D) as transformers expects.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .data.packing import KV_INDEX
from .phases import phase

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


def _causal_mask(Lq: int, Lk: int, window: int | None, device) -> torch.Tensor:
    # (Lq, Lk) bool, aligned bottom-right: query i sits at key position i + Lk - Lq
    i = torch.arange(Lq, device=device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=device)[None, :]
    allowed = j <= i
    if window:
        allowed &= (i - j) < window
    return allowed


def _explicit_causal(q, k, v, scale, softcap, window):
    # q: (Hq, Lq, D), k/v: (Hq, Lk, D) -> (Hq, Lq, D); softmax in fp32
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (Hq, Lq, Lk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = _causal_mask(q.shape[-2], k.shape[-2], window, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype)


def _loop_attention(q, k, v, cu_q, scale, softcap, window, cu_k=None, key_starts=None):
    # q/k/v: (Hq, T, D), the stream (kv already repeated); cu_q: list of segment starts + the
    # end. With cu_k (the key segments' starts + end) a segment of Lq queries has Lk >= Lq keys:
    # the Lk - Lq keys from key_starts[i] on (a shared prompt), then the queries' own
    out = torch.empty_like(q)
    for i, (s, e) in enumerate(zip(cu_q[:-1], cu_q[1:])):
        P = 0 if cu_k is None else cu_k[i + 1] - cu_k[i] - (e - s)
        qs, kk, vs = q[:, s:e], k[:, s:e], v[:, s:e]
        if P:  # slices of the stream, not a gather of the whole of it
            p0 = key_starts[i]
            kk = torch.cat([k[:, p0:p0 + P], kk], 1)
            vs = torch.cat([v[:, p0:p0 + P], vs], 1)
        if softcap or window:
            out[:, s:e] = _explicit_causal(qs, kk, vs, scale, softcap, window)
        elif not P:  # 4-D inputs: the CPU flash kernel takes only those
            out[:, s:e] = F.scaled_dot_product_attention(qs[None], kk[None], vs[None],
                                                         is_causal=True, scale=scale)[0]
        elif P < e - s:
            # a response (R queries) longer than the prompt before it (P keys): the causal
            # kernel, which skips the masked half, over the prompt's queries too (recomputed,
            # P^2 / 2 scores, and dropped) beats a mask, with which SDPA computes every score,
            # the masked R^2 / 2 too
            qq = torch.cat([q[:, p0:p0 + P], qs], 1)
            out[:, s:e] = F.scaled_dot_product_attention(qq[None], kk[None], vs[None],
                                                         is_causal=True, scale=scale)[0, :, P:]
        else:  # SDPA's is_causal aligns top-left: a mask aligns bottom-right
            mask = _causal_mask(e - s, P + e - s, None, q.device)
            out[:, s:e] = F.scaled_dot_product_attention(qs[None], kk[None], vs[None],
                                                         attn_mask=mask, scale=scale)[0]
    return out


def varlen_kernel_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the CUDA varlen kernels take these (T, H, D) inputs: one 16-bit dtype, and a head
    dimension FlashAttention supports once padded to a multiple of 8 (at most 256)."""
    D = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
            and _padded_head_dim(D) <= 256 and k.shape[-1] == D == v.shape[-1])


def _padded_head_dim(D: int) -> int:
    return -(-D // 8) * 8


def pad_head_dim(x: torch.Tensor) -> torch.Tensor:
    # zeros on the right of the head dimension: q.k and the softmax (with an explicit scale) are
    # unchanged, and the output's extra columns (zero weights of v) are cut off after
    D = x.shape[-1]
    return x if D % 8 == 0 else F.pad(x, (0, _padded_head_dim(D) - D))


def cuda_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, softcap, window, groups):
    # q: (Tq, Hq, D), k/v: (Tk, Hkv, D) -> (Tq, Hq, D), or None when no CUDA backend fits. Both
    # kernels align causal masks bottom-right when a segment has more keys than queries.
    if _flash_varlen is not None:
        kwargs = dict(softmax_scale=scale, causal=True)
        if window:
            kwargs["window_size"] = (window - 1, 0)
        if softcap:
            kwargs["softcap"] = softcap
        return _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
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
    return _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The function transformers calls in every attention layer (see the module docstring)."""
    with phase("attention"):
        return _packed_attention(query, key, value, scaling, dropout, **kwargs)


def _packed_attention(query, key, value, scaling, dropout, **kwargs):
    if dropout:
        raise ValueError(f"{ATTN_IMPLEMENTATION} does not support attention dropout")
    B, Hq, T, D = query.shape
    groups = Hq // key.shape[1]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(D)
    softcap = kwargs.get("softcap") or None
    window = kwargs.get("sliding_window") or None
    cu = kwargs.get("cu_seq_lens_q")
    kv_index = kwargs.get(KV_INDEX)
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
    cu_k, max_k = cu, max_len
    if kv_index is not None:  # keys other than the queries (shared prompts: see data.groups)
        cu_k, max_k = kwargs["cu_seq_lens_k"], int(kwargs["max_length_k"])
    if query.is_cuda:
        k, v = key, value
        if kv_index is not None:  # every segment's keys gathered from the stream
            k, v = key.index_select(2, kv_index), value.index_select(2, kv_index)
        q, k, v = (x[0].transpose(0, 1) for x in (query, k, v))  # (T, H, D)
        if torch.is_autocast_enabled("cuda"):
            # the projections ran in the autocast dtype, but RoPE multiplies q and k by fp32
            # cos / sin (HF computes them in the fp32 hidden states' dtype): the varlen kernels,
            # like SDPA under autocast, take the autocast dtype
            dtype = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if varlen_kernel_fits(q, k, v):
            out = cuda_varlen(pad_head_dim(q), pad_head_dim(k), pad_head_dim(v),
                               cu.to(torch.int32), cu_k.to(torch.int32), max_len, max_k, scale,
                               softcap, window, groups)
            if out is not None:
                return out[..., :D].unsqueeze(0), None  # (1, T, Hq, D)
    # CPU path: host syncs per layer, fine on a CPU
    starts = None if kv_index is None else kv_index[cu_k[:-1].long()].tolist()
    out = _loop_attention(query[0], _repeat_kv(key[0], groups, 0), _repeat_kv(value[0], groups, 0),
                          cu.tolist(), scale, softcap, window,
                          None if kv_index is None else cu_k.tolist(), starts)  # (Hq, T, D)
    return out.transpose(0, 1).unsqueeze(0).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, packed_attention_forward)
