"""Head projection + (bucket-)weighted token cross-entropy, without materialising (N, V) logits.

    z_t   = softcap(h_t @ W^T)            softcap(x) = c * tanh(x / c), or x when c is None
    CE_t  = logsumexp(z_t) - z_t[y_t]
    loss  = sum_t w_t * CE_t              (reduction="sum";  "none" returns w_t * CE_t per token)

Rows with y_t == ignore_index contribute nothing (CE_t = 0). The gradient of row t is

    dz_t = g_t * (softmax(z_t) - onehot(y_t)),     g_t = w_t * grad_out(_t)
    dl_t = dz_t * (1 - (z_t / c)^2)                (softcap chain rule)
    dh_t = dl_t @ W,   dW = sum_t dl_t^T h_t

Backends (chosen per call, never by swapping symbols at import):
- "triton": the fused kernels below (CUDA; on a CPU only under TRITON_INTERPRET=1, for tests);
- "torch": the chunked twin: rows are processed in chunks whose logits fit a fixed budget; the
  forward keeps only the per-row log-sum-exp, the backward recomputes each chunk's logits. Peak extra
  memory is O(chunk * V) instead of O(N * V). Ignored rows are dropped before any matmul. Accumulates
  in fp32 (fp64 for fp64 inputs). The CPU production path;
- "reference": full logits in fp32 (fp64 for fp64 inputs), autograd through torch ops: the oracle
  of tests and benchmarks;
- "auto": "triton" for CUDA tensors, "torch" otherwise.

The Triton kernels (the Cut Cross-Entropy approach: recompute, never store logits):
- forward, grid (row blocks, vocabulary splits): each program multiplies its rows' hidden block by
  successive (BLOCK_V, H) slices of the head weight in SRAM (tl.dot, fp32 accumulate, looping over H
  in BLOCK_H steps), applies the softcap, and keeps an online max, the sum-exp of the off-target
  logits and the target logit; CE = log1p(S_off * exp(max - z_y)) then has no cancellation even
  when p(target) -> 1 (where lse - z_y would lose all its digits in fp32).
  Splitting the vocabulary gives enough programs when N is small (N / BLOCK_N row blocks alone
  cannot fill an H100's 132 SMs); the partial (max, sum-exp, target logit) of the splits are merged
  by a few (S, N) torch ops, without a host sync. Row blocks whose rows are all ignored (prompt
  tokens of a packed batch) skip all work.
- backward, grid (row blocks, vocabulary blocks): each program recomputes its (BLOCK_N, BLOCK_V)
  logit tile, forms the softmax part g * p * softcap' in fp32, and adds its contributions to d_hidden
  (tile @ W_blk) and d_weight (tile^T @ h_blk) with fp32 atomics, H chunk by H chunk. Atomics,
  rather than a split reduction, need only one recompute of each tile and one fp32 buffer per
  gradient ((N, H) and (V, H)); a split reduction would need an (S, N, H) workspace or a second
  recompute. Row blocks with no gradient (ignored or zero-weight rows) return at once; frozen inputs
  (no requires_grad) get no atomics at all.
  The target column is left out of the tile and applied outside the kernel in fp32, with
  p_y - 1 = expm1(-CE) (a gather of W[y] and an index_add into d_weight), so a peaked
  distribution (p(target) = 0.999) keeps its gradient (p - 1 = -1e-3) with bf16 inputs: only the
  small off-target probabilities pass through 16-bit in tl.dot, where p_y would cancel against 1.

Block sizes: a pinned default per GPU family (Hopper, Ampere and others); set POLYFAST_AUTOTUNE=1
to time a few candidates on first use of each shape and keep the fastest.

Shapes: hidden (N, H), weight (V, H), targets (N,) int, token_weights (N,) fp32 or None. hidden
and weight may differ in dtype (bf16 hidden states under autocast, an fp32 head): the Triton kernels
compute in hidden's dtype, the torch twin in weight's; gradients come back in each input's dtype.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency, but keep the CPU path importable
    triton, tl, HAS_TRITON = None, None, False

# Budget of fp32 logits per chunk in the torch twin (elements); about 32 MiB of logits.
CHUNK_ELEMENTS = 1 << 23
BACKENDS = ("auto", "triton", "torch", "reference")
REDUCTIONS = ("sum", "none")
IGNORE_INDEX = -100

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
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # (BLOCK_N, BLOCK_V) fp32 tile of hidden[rows] @ weight[cols]^T, looping over H
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hk = h0 + tl.arange(0, BLOCK_H)
            if EVEN_H:
                a_mask, b_mask = row_ok[:, None], col_ok[:, None]
            else:
                a_mask = row_ok[:, None] & (hk < H)[None, :]
                b_mask = col_ok[:, None] & (hk < H)[None, :]
            a = tl.load(h_ptr + rows[:, None] * stride_h + hk[None, :], mask=a_mask, other=0.0)
            b = tl.load(w_ptr + cols[:, None] * stride_w + hk[None, :], mask=b_mask, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _row_stats(h_ptr, w_ptr, y, rows, row_ok, v_start, v_end, H, stride_h, stride_w, softcap,
                   HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # over vocabulary columns [v_start, v_end): running max m, the sum-exp of the off-target
        # logits relative to m, and the target logit (0 when the target is outside the range)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_end
            z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                            BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, DOT_PRECISION)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            is_target = cols[None, :] == y[:, None]
            m_new = tl.maximum(m, tl.max(z, axis=1))
            e = tl.where(is_target, 0.0, tl.exp(z - m_new[:, None]))
            s = s * tl.exp(m - m_new) + tl.sum(e, axis=1)
            m = m_new
            zt += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        return m, s, zt

    @triton.jit
    def _fwd_kernel(h_ptr, w_ptr, y_ptr, m_ptr, s_ptr, zt_ptr, N, V, H, stride_h, stride_w,
                    v_per_split, softcap, IGNORE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # hidden (N, H), weight (V, H), y (N,) -> per split (S, N): running max m, the sum-exp of
        # the off-target logits relative to m, and the target logit (0 where not in the split)
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        y = tl.load(y_ptr + rows, mask=row_ok, other=IGNORE)
        scored = row_ok & (y != IGNORE)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if tl.max(scored.to(tl.int32), axis=0) > 0:
            v_start = pid_s * v_per_split
            m, s, zt = _row_stats(h_ptr, w_ptr, y, rows, row_ok, v_start,
                                  tl.minimum(v_start + v_per_split, V), H, stride_h, stride_w,
                                  softcap, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H,
                                  DOT_PRECISION)
        out = pid_s * N + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(zt_ptr + out, zt, mask=row_ok)

    @triton.jit
    def _bwd_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, N, V, H, stride_h,
                    stride_w, softcap, HAS_SOFTCAP: tl.constexpr, COMPUTE_DH: tl.constexpr,
                    COMPUTE_DW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # off-target part of the gradient: d_hidden (N, H) += dl @ W, d_weight (V, H) += dl^T @ h,
        # dl = g * softmax(z) * softcap'(z) with the target column left out (done in fp32 outside);
        # both fp32 buffers, by atomics
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        if tl.max(tl.abs(g), axis=0) > 0:
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
            cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                            BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, DOT_PRECISION)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            dl = tl.exp(z - lse[:, None]) * g[:, None]
            if HAS_SOFTCAP:
                zc = z / softcap
                dl = dl * (1.0 - zc * zc)
            keep = col_ok[None, :] & row_ok[:, None] & (cols[None, :] != y[:, None])
            dl = tl.where(keep, dl, 0.0)
            dl = dl.to(h_ptr.dtype.element_ty)
            for h0 in range(0, H, BLOCK_H):
                hk = h0 + tl.arange(0, BLOCK_H)
                h_ok = hk < H
                if COMPUTE_DH:
                    b = tl.load(w_ptr + cols[:, None] * stride_w + hk[None, :],
                                mask=col_ok[:, None] & h_ok[None, :], other=0.0)
                    dh = tl.dot(dl, b, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_H)
                    tl.atomic_add(dh_ptr + rows[:, None] * H + hk[None, :], dh,
                                  mask=row_ok[:, None] & h_ok[None, :], sem="relaxed")
                if COMPUTE_DW:
                    a = tl.load(h_ptr + rows[:, None] * stride_h + hk[None, :],
                                mask=row_ok[:, None] & h_ok[None, :], other=0.0)
                    dw = tl.dot(tl.trans(dl), a, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_H)
                    tl.atomic_add(dw_ptr + cols[:, None] * H + hk[None, :], dw,
                                  mask=col_ok[:, None] & h_ok[None, :], sem="relaxed")


# ---------------------------------------------------------------------------------------------
# launchers

# Pinned configs: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) per GPU family.
_CONFIGS = {
    "hopper": {"fwd": (128, 128, 64, 8, 3), "bwd": (128, 128, 64, 8, 3)},
    "ampere": {"fwd": (128, 128, 32, 8, 3), "bwd": (128, 128, 32, 8, 2)},
    "other": {"fwd": (64, 128, 32, 4, 2), "bwd": (64, 64, 32, 4, 2)},
    "interpret": {"fwd": (16, 32, 16, 1, 1), "bwd": (16, 32, 16, 1, 1)},
}
_AUTOTUNE_CANDIDATES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3),
                        (128, 128, 32, 8, 4), (64, 256, 32, 8, 3)]
_tuned: dict[tuple, tuple] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _family(device: torch.device) -> str:
    if device.type != "cuda":
        return "interpret"
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major == 9 else "ampere" if major == 8 else "other"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs: true fp32 products (tf32 would lose the 1e-5 accuracy); 16-bit: the default
    return "ieee" if dtype == torch.float32 else None


def _config(kind: str, device: torch.device, key: tuple, run) -> tuple:
    """The pinned config of the device's family, or with POLYFAST_AUTOTUNE=1 the fastest of a few
    candidates, timed once per (kind, shape key) by ``run(config)``."""
    if device.type != "cuda" or os.environ.get("POLYFAST_AUTOTUNE", "0") in ("", "0"):
        return _CONFIGS[_family(device)][kind]
    full = (kind, device.index, *key)
    if full not in _tuned:
        from triton.testing import do_bench
        times = {}
        for cfg in _AUTOTUNE_CANDIDATES:
            try:
                times[cfg] = do_bench(lambda: run(cfg), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                continue
        _tuned[full] = min(times, key=times.get) if times else _CONFIGS[_family(device)][kind]
    return _tuned[full]


def _launch_fwd(hidden, weight, targets, softcap, ignore_index, num_splits=None):
    """Per-row (CE, lse, target logit), each (N,) fp32 (0 on ignored rows).
    hidden (N, H), weight (V, H), targets (N,)."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device

    def run(cfg, splits_override=num_splits):
        bn, bv, bh, warps, stages = cfg
        n_blocks = triton.cdiv(N, bn)
        splits = splits_override or max(1, min(triton.cdiv(V, bv),
                                                triton.cdiv(4 * _num_sms(device), n_blocks)))
        v_per_split = triton.cdiv(triton.cdiv(V, splits), bv) * bv
        splits = triton.cdiv(V, v_per_split)
        m = torch.empty(splits, N, device=device, dtype=torch.float32)
        s = torch.empty_like(m)
        zt = torch.empty_like(m)
        _fwd_kernel[(n_blocks, splits)](
            hidden, weight, targets, m, s, zt, N, V, H, hidden.stride(0), weight.stride(0),
            v_per_split, float(softcap or 1.0), IGNORE=ignore_index, HAS_SOFTCAP=softcap is not None,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, EVEN_H=H % bh == 0,
            DOT_PRECISION=_dot_precision(hidden.dtype), num_warps=warps, num_stages=stages)
        return m, s, zt

    cfg = _config("fwd", device, (N // 1024, H, V, hidden.dtype), run)
    m, s, zt = run(cfg)
    # merge the splits: M = max_s m_s, S = sum_s s_s exp(m_s - M) (off-target mass), and
    # CE = lse - z_y = log(1 + S exp(M - z_y)) = log1p(r): no cancellation when p_y -> 1
    M = m.max(0).values
    scored = (targets != ignore_index) & torch.isfinite(M)
    M = torch.where(scored, M, 0.0)
    S = (s * torch.exp(m - M)).sum(0)
    zt = torch.where(scored, zt.sum(0), 0.0)
    gap = M - zt  # >= 0
    ce = torch.where(gap < 30.0, torch.log1p(S * torch.exp(gap.clamp(max=30.0))),
                     gap + torch.log(S + torch.exp(-gap)))
    ce = torch.where(scored, ce, 0.0)
    return ce, zt + ce, zt


def _launch_bwd(hidden, weight, targets, lse, g, softcap, need_h, need_w):
    """Off-target part of the gradients into fp32 buffers; None for an input that needs no grad."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    dh = torch.zeros(N, H, device=device, dtype=torch.float32) if need_h else None
    dw = torch.zeros(V, H, device=device, dtype=torch.float32) if need_w else None
    if not (need_h or need_w):
        return dh, dw

    def run(cfg):
        bn, bv, bh, warps, stages = cfg
        dummy = lse  # a pointer the kernel never touches when a gradient is not computed
        _bwd_kernel[(triton.cdiv(N, bn), triton.cdiv(V, bv))](
            hidden, weight, targets, lse, g, dh if need_h else dummy, dw if need_w else dummy, N, V, H,
            hidden.stride(0), weight.stride(0), float(softcap or 1.0),
            HAS_SOFTCAP=softcap is not None, COMPUTE_DH=need_h, COMPUTE_DW=need_w, BLOCK_N=bn,
            BLOCK_V=bv, BLOCK_H=bh, EVEN_H=H % bh == 0, DOT_PRECISION=_dot_precision(hidden.dtype),
            num_warps=warps, num_stages=stages)

    cfg = _config("bwd", device, (N // 1024, H, V, hidden.dtype, need_h, need_w), run)
    if dh is not None:
        dh.zero_()  # the tuner's trial runs (if any) accumulated into the buffers
    if dw is not None:
        dw.zero_()
    run(cfg)
    return dh, dw


class _TritonLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, ignore_index, softcap, reduction,
                num_splits):
        ctx.weight_dtype = weight.dtype
        # under autocast the hidden states are 16-bit and the head fp32: compute in hidden's dtype
        hidden, weight = hidden.contiguous(), weight.to(hidden.dtype).contiguous()
        ce, lse, zt = _launch_fwd(hidden, weight, targets, softcap, ignore_index, num_splits)
        valid = targets != ignore_index
        w = (valid.float() if token_weights is None else token_weights.float() * valid)
        out = ce * w  # (N,) fp32
        ctx.save_for_backward(hidden, weight, targets, w, ce, lse, zt)
        ctx.softcap, ctx.ignore_index = softcap, ignore_index
        return out.sum() if reduction == "sum" else out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, w, ce, lse, zt = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = (w * grad_out.float()).contiguous()  # (N,)
        dh, dw = ce_backward(hidden, weight, targets, ctx.ignore_index, g, ce, lse, zt, ctx.softcap,
                             need_h, need_w, weight_dtype=ctx.weight_dtype)
        return dh, dw, None, None, None, None, None, None


def ce_backward(hidden, weight, targets, ignore_index, g, ce, lse, zt, softcap, need_h, need_w,
                weight_dtype=None):
    """Gradients of sum_t g_t * CE_t with respect to hidden (N, H) and weight (V, H), from the
    forward's per-row CE, lse and target logit (all (N,) fp32): the off-target part in the Triton
    kernel, the target column in fp32 here. Returns (d_hidden | None, d_weight | None) in the
    dtypes of hidden and ``weight_dtype`` (default: weight's)."""
    dh, dw = _launch_bwd(hidden, weight, targets, lse, g, softcap, need_h, need_w)
    # the target column in fp32: g * (p_y - 1) * softcap'(z_y), with p_y - 1 = expm1(-CE)
    # accurate however close p_y is to 1 (CE itself came from log1p)
    coef = g * torch.expm1(-ce)
    if softcap is not None:
        coef = coef * (1.0 - (zt / softcap) ** 2)
    y = torch.where(targets != ignore_index, targets, 0).long()
    if need_h:
        dh += coef[:, None] * weight.index_select(0, y).float()
        dh = dh.to(hidden.dtype)
    if need_w:
        dw.index_add_(0, y, hidden.float() * coef[:, None])
        dw = dw.to(weight_dtype or weight.dtype)
    return dh, dw


def linear_ce_triton(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                     softcap=None, reduction="sum", num_splits=None):
    """The fused Triton kernels (see the module docstring). CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1. ``num_splits`` forces the forward's vocabulary split count (tests)."""
    if not HAS_TRITON:
        raise RuntimeError("the triton backend needs the triton package")
    _check(hidden, weight, targets, token_weights, reduction)
    if hidden.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the triton backend runs on CUDA tensors (or on CPU under "
                           "TRITON_INTERPRET=1 for testing); use backend='torch' on a CPU")
    return _TritonLinearCE.apply(hidden, weight, targets, token_weights, ignore_index, softcap,
                                 reduction, num_splits)


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


def _acc_dtype(weight: torch.Tensor) -> torch.dtype:
    # fp32 accumulation, fp64 for fp64 inputs (so the twin can serve as an fp64 check too)
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _chunk_logits(h, weight, softcap):
    # h: (C, H) -> z: (C, V) in the accumulation dtype
    return _softcap(torch.matmul(h, weight.T).to(_acc_dtype(weight)), softcap)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, ignore_index, softcap, reduction,
                chunk_rows):
        ctx.hidden_dtype = hidden.dtype
        hidden = hidden.to(weight.dtype)  # mixed dtypes (autocast): compute in the head's dtype
        acc = _acc_dtype(weight)
        N, V = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        rows = valid.nonzero()[:, 0]  # (n,) the scored rows; ignored rows do no work
        w = (torch.ones(N, device=hidden.device, dtype=acc) if token_weights is None
             else token_weights.to(acc))
        lse = torch.zeros(rows.numel(), device=hidden.device, dtype=acc)  # (n,)
        ce = torch.zeros(N, device=hidden.device, dtype=acc)  # (N,)
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
        acc = lse.dtype
        g = w * grad_out.to(acc)  # (N,) scale of each row's softmax - onehot
        d_hidden = torch.zeros_like(hidden) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
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
                d_hidden[r] = torch.matmul(dz.to(weight.dtype), weight)
            if need_w:
                d_weight.addmm_(dz.T, h.to(acc))
        if need_w:
            d_weight = d_weight.to(weight.dtype)
        if need_h:
            d_hidden = d_hidden.to(ctx.hidden_dtype)
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
    backend: "auto" | "triton" | "torch" | "reference" (see the module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and HAS_TRITON else "torch"
    if backend == "triton":
        return linear_ce_triton(hidden, weight, targets, token_weights, ignore_index=ignore_index,
                                softcap=softcap, reduction=reduction)
    if backend == "reference":
        return linear_ce_reference(hidden, weight, targets, token_weights, ignore_index=ignore_index,
                                   softcap=softcap, reduction=reduction)
    return linear_ce_torch(hidden, weight, targets, token_weights, ignore_index=ignore_index,
                           softcap=softcap, reduction=reduction)
