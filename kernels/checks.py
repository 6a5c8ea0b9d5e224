"""What every loss-head backend shares: the compute-dtype rules, the input checks, the softcap and
its derivative in torch, and which rows are scored.

Compute dtype (``compute_dtype``): the head's matmuls run under autocast in its dtype (bf16 on CUDA
with ``model.dtype: auto``, whose hidden states and head are fp32); otherwise in the inputs' dtype,
or the 16-bit one of a 16-bit / fp32 mix. 16-bit operands go through the tensor cores with fp32
accumulation; fp32 operands use true fp32 products, or TF32 when torch allows it
(``torch.backends.cuda.matmul.fp32_precision = "tf32"``, ``train.tf32`` in a config). Softmax
statistics and gradient buffers are fp32; gradients come back in each input's own dtype.

Bad ids (``check_ids``): a target outside [0, V) that is not ignored is an error. On CPU tensors
(and everywhere with POLYFAST_CHECK_IDS=1) it raises a ValueError naming the row; on CUDA the check
would cost a host sync per call, so by default the kernels poison the row's loss and gradients with
NaN on the device instead (never a finite wrong value, never an out-of-bounds access).
POLYFAST_CHECK_IDS=0 turns the host check off everywhere.
"""

from __future__ import annotations

import contextlib
import os

import torch

IGNORE_INDEX = -100
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
REDUCTIONS = ("sum", "none")


def softcapped(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(z / cap), or z when cap is None (Gemma-2's final-logit softcapping)."""
    return z if cap is None else cap * torch.tanh(z / cap)


def softcap_grad(z: torch.Tensor, cap: float | None) -> torch.Tensor | float:
    """d softcap / d logit, from the capped logit z: 1 - (z / cap)^2 (1 without a cap)."""
    return 1.0 if cap is None else 1.0 - (z / cap) ** 2


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tf32_enabled() -> bool:
    """Whether torch lets fp32 CUDA matmuls use TF32 (the fp32 kernels follow the same switch)."""
    try:
        precision = torch.backends.cuda.matmul.fp32_precision  # torch >= 2.9
    except (AttributeError, RuntimeError):
        precision = None
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    if precision == "none":  # defers to the global setting
        return getattr(torch.backends, "fp32_precision", "ieee") == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in for these operands (hidden states and head weights).

    Under autocast: the autocast dtype (fp64 operands stay fp64). Otherwise the operands' common
    dtype, or the 16-bit one of a 16-bit / fp32 mix. bf16 mixed with fp16 is an error.
    """
    dtypes = {t.dtype for t in tensors}
    bad = dtypes - {torch.float64, torch.float32, *SIXTEEN_BIT}
    if bad:
        raise ValueError("hidden states and head weights must be floating point, got "
                         f"{sorted(map(str, bad))}")
    if torch.float64 in dtypes:
        if dtypes != {torch.float64}:
            raise ValueError(f"float64 operands cannot be mixed with {sorted(map(str, dtypes))}")
        return torch.float64
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    half = dtypes & set(SIXTEEN_BIT)
    if len(half) > 1:
        raise ValueError("hidden states and head weights mix bfloat16 and float16; cast one of "
                         "them")
    return half.pop() if half else torch.float32


def dot_precision(dtype: torch.dtype) -> str | None:
    """tl.dot's input precision for operands of ``dtype``: "ieee" or "tf32" for fp32 (torch's TF32
    switch decides), None (tensor cores) for 16-bit."""
    if dtype == torch.float32:
        return "tf32" if tf32_enabled() else "ieee"
    if dtype in SIXTEEN_BIT:
        return None
    raise ValueError(f"the triton backend computes in float32, bfloat16 or float16, not {dtype}; "
                     "use backend='torch' or 'reference'")


def no_autocast(device_type: str):
    """The ops pick their compute dtype themselves (``compute_dtype``); autocast must not recast
    their internal matmuls or fp32 accumulations."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def require_fused(name: str, device: torch.device, has_triton: bool) -> None:
    """RuntimeError unless the fused backend ``name`` can run here: on CUDA, or on a CPU under
    TRITON_INTERPRET=1 (tests)."""
    if not has_triton:
        raise RuntimeError(f"the {name} backend needs the triton package")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(f"the {name} backend runs on CUDA tensors (or on CPU under "
                           "TRITON_INTERPRET=1 for testing); use backend='torch' on a CPU")


def check_ids(ids: torch.Tensor, upper: int, name: str, skip: torch.Tensor | None = None) -> None:
    """ValueError naming the first entry of ``ids`` outside [0, upper), entries where ``skip`` is
    True aside (ignored targets, unscored segment ids). Runs on CPU tensors, on any tensor with
    POLYFAST_CHECK_IDS=1 (a host sync on CUDA), never with POLYFAST_CHECK_IDS=0."""
    mode = os.environ.get("POLYFAST_CHECK_IDS", "auto")
    if mode == "0" or (mode != "1" and ids.device.type != "cpu") or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= upper)
    if skip is not None:
        bad &= ~skip
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(ids[i])} is outside [0, {upper}) "
                         f"({int(bad.sum())} such entries)")


def check_linear_ce(hidden, weight, targets, token_weights, reduction, ignore_index) -> None:
    """ValueError for inputs linear_cross_entropy cannot take, naming the one at fault."""
    # hidden: (N, H), weight: (V, H), targets: (N,), token_weights: (N,) | None
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, H) and weight (V, H) disagree: {tuple(hidden.shape)} vs "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int32/int64, got {targets.dtype}")
    if token_weights is not None:
        if token_weights.shape != hidden.shape[:1]:
            raise ValueError(f"token_weights must be ({hidden.shape[0]},), got "
                             f"{tuple(token_weights.shape)}")
        if not token_weights.is_floating_point():
            raise ValueError(f"token_weights must be floating point, got {token_weights.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_ids(targets, weight.shape[0], f"targets (ignore_index {ignore_index})",
              skip=targets == ignore_index)


def grad_dtypes(hidden, weight, token_weights) -> tuple:
    """The dtypes the gradients go back in: each input's own."""
    return hidden.dtype, weight.dtype, None if token_weights is None else token_weights.dtype


def target_rows(targets: torch.Tensor, ignore_index: int, V: int) -> tuple:
    """(scored, in_range, safe): the rows to score, those whose target is a real class, and the
    targets with every other row set to 0 (a safe gather index)."""
    scored = targets != ignore_index
    in_range = scored & (targets >= 0) & (targets < V)
    return scored, in_range, torch.where(in_range, targets, 0).long()
