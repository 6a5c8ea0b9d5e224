"""Head projection + (bucket-)weighted token cross-entropy, without materialising (N, V) logits.

    z_t  = softcap(h_t @ W^T)          CE_t = logsumexp(z_t) - z_t[y_t]
    loss = sum_t w_t * CE_t            (reduction "sum"; "none": w_t * CE_t per token)

Which backend runs (``linear_cross_entropy``, ``backend="auto"``, decided per call):

    where                                     backend      file
    CPU tensors (or no triton)                "torch"      torch_twin.py   chunked, no (N, V) buffer
    CUDA, with a backward (training)          cost model   cost_model.py   -> "gemm" at real head
                                                                           shapes (e.g. bf16, 16k
                                                                           tokens): gemm.py
    CUDA, forward only (a frozen model)       cost model   -> "triton": fused_fwd.py

    "triton"     fused_fwd.py + fused_bwd.py   logits in SRAM, gradient filter, fp32 atomics
    "gemm"       gemm.py                       cuBLAS over vocabulary chunks + Triton elementwise
    "torch"      torch_twin.py                 the chunked twin (the CPU production path)
    "reference"  torch_twin.py                 full fp32 / fp64 logits: the oracle of the tests

Shared pieces: checks.py (compute dtype, input checks), configs.py (block sizes, padding),
triton_helpers.py (@triton.jit helpers, the merge of per-row statistics). Rows with
y_t == ignore_index contribute nothing; callers that score only some rows send only those
(``polyfast.data.packing.ScoredTokens``): no backend reorders rows.

Shapes: hidden (N, H), weight (V, H), targets (N,) int, token_weights (N,) float or None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import fused_bwd, fused_fwd, gemm
from .checks import (SIXTEEN_BIT, check_linear_ce, compute_dtype, dot_precision, grad_dtypes,
                     no_autocast, require_fused)
from .configs import padded, padded_size
from .cost_model import choose_fused, device_spec
from .torch_twin import linear_ce_reference, linear_ce_torch
from .triton_helpers import HAS_TRITON

BACKENDS = ("auto", "triton", "gemm", "torch", "reference")


def auto_backend(hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """The backend "auto" runs: "torch" off CUDA; on CUDA the fused backend the cost model
    predicts faster for this shape, forward + backward (forward alone when neither input will get
    a gradient), the "triton" backward taken as unfiltered (its filter rate depends on the data)."""
    if not (hidden.is_cuda and HAS_TRITON):
        return "torch"
    b = 2 if compute_dtype(hidden, weight) in SIXTEEN_BIT else 4
    backward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return choose_fused(hidden.shape[0], hidden.shape[1], weight.shape[0], b,
                        spec=device_spec(hidden.device), backward=backward)


def linear_cross_entropy(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                         softcap=None, reduction="sum", backend="auto", filter_eps=None):
    """``sum_t w_t * CE_t`` of the head projection ``hidden @ weight.T`` without (N, V) logits.

    hidden (N, H), weight (V, H), targets (N,), token_weights (N,) float or None (= 1).
    reduction "sum" gives a scalar, "none" the per-token ``w_t * CE_t`` (N,) (0 on ignored rows).
    backend: "auto" | "triton" | "gemm" | "torch" | "reference" (the table above).
    The matmuls run in ``compute_dtype(hidden, weight)`` (the autocast dtype under autocast);
    gradients reach hidden, weight and token_weights, each in its own dtype. ``filter_eps``: the
    "triton" backward's gradient filter (default 2^-12 for 16-bit operands, 0 = exact).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = auto_backend(hidden, weight)
    options = dict(ignore_index=ignore_index, softcap=softcap, reduction=reduction)
    if backend == "triton":
        return linear_ce_triton(hidden, weight, targets, token_weights, filter_eps=filter_eps,
                                **options)
    if backend == "gemm":
        return linear_ce_gemm(hidden, weight, targets, token_weights, **options)
    if backend == "reference":
        return linear_ce_reference(hidden, weight, targets, token_weights, **options)
    return linear_ce_torch(hidden, weight, targets, token_weights, **options)


# ---------------------------------------------------------------------------------------------
# the fused backends: one autograd Function, the backend's pieces from a table


@dataclass(frozen=True)
class LinearCEParams:
    """What a fused call computes, checked and resolved once: the backend, the loss options, the
    compute dtype, and the "triton" backend's knobs."""

    backend: str                    # "triton" | "gemm"
    ignore_index: int
    softcap: float | None
    reduction: str
    dtype: torch.dtype              # compute_dtype of the operands
    filter_eps: float = 0.0         # "triton" backward's gradient filter (0 = exact)
    num_splits: int | None = None   # "triton" forward's vocabulary splits (None: as the GPU needs)


@dataclass(frozen=True)
class FusedBackend:
    """A fused backend's three pieces. ``prepare`` (hidden, weight, dtype) -> the operands as its
    kernels read them; ``forward`` (h, w, targets, params) -> per-row (CE, lse, target logit);
    ``backward``: ``fused_bwd.backward``'s arguments -> (d_hidden, d_weight)."""

    prepare: Callable
    forward: Callable
    backward: Callable


def padded_operands(hidden, weight, dtype):
    """hidden and weight in ``dtype``, H zero-padded to the fused kernels' multiple."""
    Hp = padded_size(hidden.shape[1], hidden.device)
    return padded(hidden, dtype, Hp), padded(weight, dtype, Hp)


def _plain_operands(hidden, weight, dtype):
    # the "gemm" backend: any H, no copy of operands already in the compute dtype
    return hidden.to(dtype).contiguous(), weight.to(dtype).contiguous()


FUSED = {
    "triton": FusedBackend(padded_operands, lambda h, w, y, p: fused_fwd.launch_fwd(
        h, w, y, p.softcap, p.ignore_index, p.num_splits), fused_bwd.backward),
    "gemm": FusedBackend(_plain_operands, lambda h, w, y, p: gemm.forward(
        h, w, y, p.softcap, p.ignore_index), gemm.backward),
}


class FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, p: LinearCEParams):
        ctx.dtypes = grad_dtypes(hidden, weight, token_weights)
        impl = FUSED[p.backend]
        with no_autocast(hidden.device.type):
            y = targets.long().contiguous()  # (N,)
            h, w = impl.prepare(hidden, weight, p.dtype)  # (N, H'), (V, H')
            ce, lse, zt = impl.forward(h, w, y, p)  # (N,) each, fp32
            valid = y != p.ignore_index
            tw = valid.float() if token_weights is None else token_weights.float() * valid
            out = ce * tw  # (N,) fp32
        ctx.save_for_backward(h, w, y, tw, ce, lse, zt)
        ctx.p, ctx.H = p, hidden.shape[1]
        return out.sum() if p.reduction == "sum" else out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, y, tw, ce, lse, zt = ctx.saved_tensors
        need_h, need_w, need_tw = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        p = ctx.p
        with no_autocast(h.device.type):
            grad_out = grad_out.float()
            g = (tw * grad_out).contiguous()  # (N,) each row's weight of its CE
            dh, dw = FUSED[p.backend].backward(
                h, w, y, g, ce, lse, zt, softcap=p.softcap, ignore_index=p.ignore_index,
                need_h=need_h, need_w=need_w, dtypes=ctx.dtypes[:2], H=ctx.H,
                filter_eps=p.filter_eps)
            d_tw = (ce * grad_out).to(ctx.dtypes[2]) if need_tw else None
        return dh, dw, None, d_tw, None


def _fused(backend, hidden, weight, targets, token_weights, *, ignore_index, softcap, reduction,
           num_splits=None, filter_eps=None):
    check_linear_ce(hidden, weight, targets, token_weights, reduction, ignore_index)
    require_fused(backend, hidden.device, HAS_TRITON)
    dtype = compute_dtype(hidden, weight)
    dot_precision(dtype)  # a clear error for float64
    eps = fused_bwd.default_filter_eps(dtype, filter_eps) if backend == "triton" else 0.0
    params = LinearCEParams(backend, ignore_index, softcap, reduction, dtype, eps, num_splits)
    return FusedLinearCE.apply(hidden, weight, targets, token_weights, params)


def linear_ce_triton(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                     softcap=None, reduction="sum", num_splits=None, filter_eps=None):
    """The fused Triton kernels (fused_fwd.py, fused_bwd.py). CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1. ``num_splits`` forces the forward's vocabulary split count (tests);
    ``filter_eps`` the backward's gradient filter (default ``default_filter_eps``; 0 = exact)."""
    return _fused("triton", hidden, weight, targets, token_weights, ignore_index=ignore_index,
                  softcap=softcap, reduction=reduction, num_splits=num_splits,
                  filter_eps=filter_eps)


def linear_ce_gemm(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                   softcap=None, reduction="sum"):
    """Vocabulary chunks through cuBLAS GEMMs and Triton elementwise kernels (gemm.py). CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1."""
    return _fused("gemm", hidden, weight, targets, token_weights, ignore_index=ignore_index,
                  softcap=softcap, reduction=reduction)
