"""Head projection + (bucket-)weighted token cross-entropy, without materialising (N, V) logits.

    z_t   = softcap(h_t @ W^T)            softcap(x) = c * tanh(x / c), or x when c is None
    CE_t  = logsumexp(z_t) - z_t[y_t]
    loss  = sum_t w_t * CE_t              (reduction="sum";  "none" returns w_t * CE_t per token)

rows with y_t == ignore_index contribute nothing (CE_t = 0). The gradient of row t is

    dz_t = g_t * (softmax(z_t) - onehot(y_t)),     g_t = w_t * grad_out(_t)
    dl_t = dz_t * (1 - (z_t / c)^2)                (softcap chain rule)
    dh_t = dl_t @ W,   dW = sum_t dl_t^T h_t

Backends (chosen per call, never by swapping symbols at import):
- "reference": full logits in fp32 (fp64 for fp64 inputs), autograd through torch ops: the oracle
  of tests and benchmarks;
- "torch": the chunked twin: rows are processed in chunks whose logits fit a fixed budget; the
  forward keeps only the per-row log-sum-exp, the backward recomputes each chunk's logits. Peak extra
  memory is O(chunk * V) instead of O(N * V). Rows that are ignored are dropped before any matmul.
  Accumulates in fp32 (d_weight in an fp32 (V, H) buffer). This is the CPU production path.
- "auto": "torch" (the fused Triton kernel of a later release takes CUDA).

Shapes: hidden (N, H), weight (V, H), targets (N,) int, token_weights (N,) fp32 or None.
"""

from __future__ import annotations

import torch

# Budget of fp32 logits per chunk in the torch twin (elements); about 32 MiB of logits.
CHUNK_ELEMENTS = 1 << 23
BACKENDS = ("auto", "torch", "reference")
REDUCTIONS = ("sum", "none")


def _softcap(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _check(hidden, weight, targets, token_weights, reduction):
    # hidden: (N, H), weight: (V, H), targets: (N,), token_weights: (N,) | None
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, H) and weight (V, H) disagree: {tuple(hidden.shape)} vs "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int32/int64, got {targets.dtype}")
    if token_weights is not None and token_weights.shape != hidden.shape[:1]:
        raise ValueError(f"token_weights must be ({hidden.shape[0]},), got "
                         f"{tuple(token_weights.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ---------------------------------------------------------------------------------------------
# reference: full logits


def linear_ce_reference(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                        softcap=None, reduction="sum"):
    """Full-logits oracle; differentiable through plain torch ops."""
    _check(hidden, weight, targets, token_weights, reduction)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = _softcap(hidden.to(acc) @ weight.to(acc).T, softcap)  # (N, V)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).long()
    ce = logits.logsumexp(-1) - logits.gather(1, safe[:, None])[:, 0]  # (N,)
    w = valid.to(acc) if token_weights is None else token_weights.to(acc) * valid
    ce = torch.where(valid, ce, 0.0) * w
    return ce.sum() if reduction == "sum" else ce


# ---------------------------------------------------------------------------------------------
# torch twin: chunked over rows, custom autograd


def _rows_per_chunk(V: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, CHUNK_ELEMENTS // max(V, 1))


def _chunk_logits(h, weight, softcap):
    # h: (C, H) -> z: (C, V) fp32
    return _softcap(torch.matmul(h, weight.T).float(), softcap)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, ignore_index, softcap, reduction,
                chunk_rows):
        N, V = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        rows = valid.nonzero()[:, 0]  # (n,) the scored rows; ignored rows do no work
        w = (torch.ones(N, device=hidden.device) if token_weights is None
             else token_weights.float())
        lse = torch.zeros(rows.numel(), device=hidden.device)  # (n,) fp32
        ce = torch.zeros(N, device=hidden.device)  # (N,) fp32
        step = _rows_per_chunk(V, chunk_rows)
        for s in range(0, rows.numel(), step):
            r = rows[s:s + step]
            z = _chunk_logits(hidden[r], weight, softcap)  # (C, V)
            lse_c = z.logsumexp(-1)
            lse[s:s + step] = lse_c
            ce[r] = lse_c - z.gather(1, targets[r].long()[:, None])[:, 0]
        out = ce * w
        ctx.save_for_backward(hidden, weight, targets, w, rows, lse)
        ctx.softcap, ctx.reduction, ctx.step = softcap, reduction, step
        return out.sum() if reduction == "sum" else out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, w, rows, lse = ctx.saved_tensors
        softcap = ctx.softcap
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = w * grad_out.float()  # (N,) scale of each row's softmax - onehot
        d_hidden = torch.zeros_like(hidden) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        step = ctx.step
        for s in range(0, rows.numel(), step):
            r = rows[s:s + step]
            h = hidden[r]  # (C, H)
            z = _chunk_logits(h, weight, softcap)  # (C, V)
            dz = torch.exp(z - lse[s:s + step, None])  # softmax, (C, V)
            dz.scatter_add_(1, targets[r].long()[:, None], torch.full_like(lse[s:s + step, None], -1.0))
            dz *= g[r, None]
            if softcap is not None:
                dz *= 1.0 - (z / softcap) ** 2
            if need_h:
                d_hidden[r] = torch.matmul(dz.to(weight.dtype), weight).to(hidden.dtype)
            if need_w:
                d_weight.addmm_(dz.T, h.float())
        if need_w:
            d_weight = d_weight.to(weight.dtype)
        return d_hidden, d_weight, None, None, None, None, None, None


def linear_ce_torch(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                    softcap=None, reduction="sum", chunk_rows=None):
    """The chunked pure-PyTorch twin (no (N, V) buffer); see the module docstring."""
    _check(hidden, weight, targets, token_weights, reduction)
    return _ChunkedLinearCE.apply(hidden, weight, targets, token_weights, ignore_index, softcap,
                                  reduction, chunk_rows)


# ---------------------------------------------------------------------------------------------
# public entry point


def linear_cross_entropy(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                         softcap=None, reduction="sum", backend="auto"):
    """``sum_t w_t * CE_t`` of the head projection ``hidden @ weight.T`` without (N, V) logits.

    hidden (N, H), weight (V, H), targets (N,), token_weights (N,) fp32 or None (= 1).
    reduction "sum" gives a scalar, "none" the per-token ``w_t * CE_t`` (N,) (0 on ignored rows).
    backend: "auto" | "torch" | "reference" (see the module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return linear_ce_reference(hidden, weight, targets, token_weights, ignore_index=ignore_index,
                                   softcap=softcap, reduction=reduction)
    return linear_ce_torch(hidden, weight, targets, token_weights, ignore_index=ignore_index,
                           softcap=softcap, reduction=reduction)
