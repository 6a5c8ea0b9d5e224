"""Linear cross-entropy in plain PyTorch: the chunked twin (the CPU production path and the fallback
anywhere) and the full-logits reference (the oracle of tests and benchmarks).

Twin: rows are processed in chunks whose logits fit a fixed budget (CHUNK_ELEMENTS); the forward
keeps only the per-row log-sum-exp, the backward recomputes each chunk's logits. Peak extra memory
is O(chunk * V) instead of O(N * V). Ignored rows are dropped before any matmul. It accumulates in
fp32, or fp64 for fp64 inputs (so it can serve as an fp64 check too).

Reference: full logits in fp32 (fp64 for fp64 inputs) whatever the compute dtype, autograd through
torch ops.

Shapes: hidden (N, H), weight (V, H), targets (N,) int, token_weights (N,) float or None.
"""

from __future__ import annotations

import torch

from .checks import (check_linear_ce, compute_dtype, grad_dtypes, no_autocast, softcap_grad,
                     softcapped, target_rows)

# Budget of fp32 logits per chunk in the torch twin (elements); about 32 MiB of logits.
CHUNK_ELEMENTS = 1 << 23


def linear_ce_reference(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                        softcap=None, reduction="sum"):
    """Full-logits oracle in fp32 (fp64 for fp64 inputs) whatever the compute dtype;
    differentiable through plain torch ops."""
    check_linear_ce(hidden, weight, targets, token_weights, reduction, ignore_index)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    with no_autocast(hidden.device.type):
        logits = softcapped(hidden.to(acc) @ weight.to(acc).T, softcap)  # (N, V)
        scored, in_range, safe = target_rows(targets, ignore_index, weight.shape[0])
        ce = logits.logsumexp(-1) - logits.gather(1, safe[:, None])[:, 0]  # (N,)
        # a bad target (only with the id check off) poisons the row's loss and gradients
        ce = torch.where(scored, ce, 0.0) * torch.where(scored & ~in_range, float("nan"), 1.0)
        w = scored.to(acc) if token_weights is None else token_weights.to(acc) * scored
        ce = ce * w
    return ce.sum() if reduction == "sum" else ce


def rows_per_chunk(V: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, CHUNK_ELEMENTS // max(V, 1))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_logits(h, weight, cap):
    """h (C, H), weight (V, H), both of the compute dtype -> z (C, V) in the accumulation dtype."""
    return softcapped(torch.matmul(h, weight.T).to(acc_dtype(weight.dtype)), cap)


class ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, ignore_index, cap, reduction,
                chunk_rows, dtype):
        ctx.dtypes = grad_dtypes(hidden, weight, token_weights)
        with no_autocast(hidden.device.type):
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            acc = acc_dtype(dtype)
            N, V = hidden.shape[0], weight.shape[0]
            scored, in_range, _ = target_rows(targets, ignore_index, V)
            rows = in_range.nonzero()[:, 0]  # (n,) the scored rows; ignored rows do no work
            w = (torch.ones(N, device=hidden.device, dtype=acc) if token_weights is None
                 else token_weights.to(acc))
            lse = torch.zeros(rows.numel(), device=hidden.device, dtype=acc)  # (n,)
            ce = torch.zeros(N, device=hidden.device, dtype=acc)  # (N,)
            step = rows_per_chunk(V, chunk_rows)
            for s in range(0, rows.numel(), step):
                r = rows[s:s + step]
                z = chunk_logits(hidden[r], weight, cap)  # (C, V)
                lse_c = z.logsumexp(-1)
                lse[s:s + step] = lse_c
                ce[r] = lse_c - z.gather(1, targets[r].long()[:, None])[:, 0]
            ce = torch.where(scored & ~in_range, float("nan"), ce)  # (only with the check off)
            out = ce * w
        ctx.save_for_backward(hidden, weight, targets, w, rows, lse, ce)
        ctx.cap, ctx.reduction, ctx.step = cap, reduction, step
        return out.sum() if reduction == "sum" else out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, w, rows, lse, ce = ctx.saved_tensors
        need_h, need_w, need_tw = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        acc = lse.dtype
        with no_autocast(hidden.device.type):
            grad_out = grad_out.to(acc)
            g = w * grad_out  # (N,) scale of each row's softmax - onehot
            d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
            d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            step = ctx.step
            for s in range(0, rows.numel(), step):
                r = rows[s:s + step]
                h = hidden[r]  # (C, H)
                z = chunk_logits(h, weight, ctx.cap)  # (C, V)
                dz = torch.exp(z - lse[s:s + step, None])  # softmax, (C, V)
                dz.scatter_add_(1, targets[r].long()[:, None],
                                torch.full_like(lse[s:s + step, None], -1.0))
                dz *= g[r, None]
                if ctx.cap is not None:
                    dz *= softcap_grad(z, ctx.cap)
                if need_h:
                    d_hidden[r] = torch.matmul(dz.to(weight.dtype), weight).to(acc)
                if need_w:
                    d_weight.addmm_(dz.T, h.to(acc))
            # a bad target's row (possible only with the id check off): NaN gradients, as on the
            # Triton path (its row of d_hidden, row 0 of d_weight), without a host sync
            bad = torch.isnan(ce)
            if need_h:
                d_hidden = torch.where(bad[:, None], float("nan"), d_hidden).to(ctx.dtypes[0])
            if need_w:
                d_weight[0] += torch.where(bad.any(), float("nan"), 0.0)
                d_weight = d_weight.to(ctx.dtypes[1])
            d_tw = (ce * grad_out).to(ctx.dtypes[2]) if need_tw else None
        return d_hidden, d_weight, None, d_tw, None, None, None, None, None


def linear_ce_torch(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                    softcap=None, reduction="sum", chunk_rows=None):
    """The chunked pure-PyTorch twin (no (N, V) buffer); see the module docstring."""
    check_linear_ce(hidden, weight, targets, token_weights, reduction, ignore_index)
    return ChunkedLinearCE.apply(hidden, weight, targets, token_weights, ignore_index, softcap,
                                 reduction, chunk_rows, compute_dtype(hidden, weight))
