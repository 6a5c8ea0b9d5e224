"""The fused backward of linear cross-entropy (the "triton" backend): logits recomputed tile by
tile, the gradient filter, fp32 atomics; no (N, V) buffer.

    dz_t = g_t * (softmax(z_t) - onehot(y_t)),   dl_t = dz_t * (1 - (z_t / c)^2)   (softcap c)
    dh   = dl @ W,                                dW  = dl^T @ h

A 1-D grid in grouped order (GROUP_N row blocks sweep the vocabulary together, so their d_hidden
tiles and the W tiles they share stay in L2): each program recomputes its (BLOCK_N, BLOCK_V) logit
tile and the softmax p. If any p in the tile reaches its row's filter threshold (filter_eps x the
row's off-target mass 1 - p_y; ``default_filter_eps``: 2^-12 for 16-bit operands, 0 = exact, the
default for fp32), it forms g * p * softcap' and adds its contributions to d_hidden (tile @ W_blk)
and d_weight (tile^T @ h_blk) with fp32 atomics, H chunk by H chunk; else it skips the products.
Relative to the row's off-target mass, a skipped tile's probabilities are each negligible next to
the row's gradient scale: spread rows lose nearly all their tiles, peaked rows keep the tiles of
their likely tokens, and a row with p_y -> 1 keeps its small off-target mass (an absolute threshold
would drop it whole). Atomics, rather than a split reduction, need one recompute of each tile and
one fp32 buffer per gradient. Rows without gradient contribute exact zeros; frozen inputs get no
atomics at all. Offsets are int64 (V * H and N * H may pass 2^31).

d_weight is built slab by slab (``bwd_slab_rows``: one launch per BWD_SLAB_ELEMENTS-sized slab of
head rows, 16384 rows at H = 2048): each slab's fp32 buffer gets the kernel's atomics and the
target column's terms, then is written out in the weight's dtype, so no (V, H) fp32 buffer exists.
The target column is left out of the tile and applied here in fp32, with p_y - 1 = expm1(-CE)
(a gather of W[y] and an index_add into d_weight), so a peaked distribution (p(target) = 0.999)
keeps its gradient (p - 1 = -1e-3) with bf16 inputs.

Shapes: hidden (N, Hp), weight (V, Hp) padded; targets (N,) int64; g, ce, lse, zt (N,) fp32.
"""

from __future__ import annotations

import torch

from .checks import SIXTEEN_BIT, dot_precision, softcap_grad, target_rows
from .configs import GROUP_N, launch_config
from .triton_helpers import HAS_TRITON, apply_softcap, logit_tile, softcap_chain

DEFAULT_FILTER_EPS = 2.0 ** -12
# fp32 d_weight values per launch of the fused backward (a slab of head rows): 128 MiB
BWD_SLAB_ELEMENTS = 1 << 25

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def bwd_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, thr_ptr, dh_ptr, dw_ptr, N, V, H,
                   stride_h, stride_w, softcap, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
                   COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, GROUP_N: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
        # off-target part of the gradient: d_hidden (N, H) += dl @ W, d_weight (V, H) += dl^T @ h,
        # dl = g * softmax(z) * softcap'(z) with the target column left out (done in fp32 outside);
        # both fp32 buffers, by atomics, in grouped launch order
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(N, BLOCK_N)
        v_blocks = tl.cdiv(V, BLOCK_V)
        per_group = GROUP_N * v_blocks
        first = (pid // per_group) * GROUP_N
        group_rows = tl.minimum(n_blocks - first, GROUP_N)
        pid_n = first + (pid % per_group) % group_rows
        pid_v = (pid % per_group) // group_rows
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        active = row_ok & (g != 0.0)  # rows without gradient have no log-sum-exp to speak of
        if tl.max(active.to(tl.int32), axis=0) > 0:
            lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
            y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
            cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            z = logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                           BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
            z = apply_softcap(z, softcap, HAS_SOFTCAP)
            keep = active[:, None] & col_ok[None, :] & (cols[None, :] != y[:, None])
            # tl.where, not a product with a 0/1 mask: an inactive row's exp(z - lse) may be inf
            p = tl.where(keep, tl.exp(z - lse[:, None]), 0.0)
            # gradient filter: a tile whose every probability is below its row's threshold
            # (filter_eps x the row's off-target mass 1 - p_y) skips its products
            passes = True
            if FILTER:
                thr = tl.load(thr_ptr + rows, mask=active, other=2.0)  # 2 > any probability
                passes = tl.max(tl.max((p >= thr[:, None]).to(tl.int32), axis=1), axis=0) > 0
            if passes:
                dl = p * g[:, None]
                if HAS_SOFTCAP:
                    dl = softcap_chain(dl, z, softcap)
                dl = dl.to(h_ptr.dtype.element_ty)
                h_rows = rows[:, None].to(tl.int64)
                w_rows = cols[:, None].to(tl.int64)
                for h0 in range(0, H, BLOCK_H):
                    hk = h0 + tl.arange(0, BLOCK_H)
                    if COMPUTE_DH:
                        b = tl.load(w_ptr + w_rows * stride_w + hk[None, :], mask=col_ok[:, None],
                                    other=0.0)
                        dh = tl.dot(dl, b, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_H)
                        tl.atomic_add(dh_ptr + h_rows * H + hk[None, :], dh,
                                      mask=row_ok[:, None], sem="relaxed")
                    if COMPUTE_DW:
                        a = tl.load(h_ptr + h_rows * stride_h + hk[None, :], mask=row_ok[:, None],
                                    other=0.0)
                        dw = tl.dot(tl.trans(dl), a, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_H)
                        tl.atomic_add(dw_ptr + w_rows * H + hk[None, :], dw,
                                      mask=col_ok[:, None], sem="relaxed")


# the argument types the launcher passes (sizes and strides: i32), for bench.compile_check
SIGNATURES = {"linear_ce.bwd": {
    "types": {"h_ptr": "*operand", "w_ptr": "*operand", "y_ptr": "*i64", "lse_ptr": "*fp32",
              "g_ptr": "*fp32", "thr_ptr": "*fp32", "dh_ptr": "*fp32", "dw_ptr": "*fp32",
              "softcap": "fp32"},
    "constexprs": lambda v: {"COMPUTE_DH": "dh" in v.what, "COMPUTE_DW": "dw" in v.what,
                             "FILTER": "filter" in v.what, "GROUP_N": GROUP_N}}}


def default_filter_eps(dtype: torch.dtype, filter_eps: float | None = None) -> float:
    """The fused backward's gradient filter: ``filter_eps`` when given (0 = exact), else 2^-12
    for 16-bit operands and 0 for fp32. A tile's products are skipped when each of its
    probabilities is below filter_eps times its row's off-target mass 1 - p_y."""
    if filter_eps is None:
        return DEFAULT_FILTER_EPS if dtype in SIXTEEN_BIT else 0.0
    filter_eps = float(filter_eps)
    if not filter_eps >= 0.0:  # also NaN
        raise ValueError(f"filter_eps must be >= 0 (0 = exact), got {filter_eps}")
    return filter_eps


def bwd_slab_rows(V: int, H: int) -> int:
    """Head rows per launch of the fused backward: its fp32 d_weight slab holds at most
    BWD_SLAB_ELEMENTS values (16384 rows at H = 2048), so no (V, H) fp32 buffer is needed."""
    return max(1, min(V, BWD_SLAB_ELEMENTS // max(H, 1)))


def launch_bwd(hidden, weight, targets, lse, g, softcap, dh, dw, thresholds=None):
    """One launch over ``weight`` (Vs, Hp) (the head or a slab of it; targets relative to its
    first row): the off-target gradient contributions are added into the fp32 buffers dh (N, Hp)
    and dw (>= Vs, Hp), either None when not wanted. ``thresholds`` (N,) fp32: the gradient
    filter's per-row probability threshold (None: exact)."""
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0 or (dh is None and dw is None):
        return

    def launch(cfg, dh, dw):
        bn, bv, bh, warps, stages = cfg
        dummy = lse  # a pointer the kernel never touches when a gradient is not computed
        bwd_kernel[(triton.cdiv(N, bn) * triton.cdiv(V, bv),)](
            hidden, weight, targets, lse, g, dummy if thresholds is None else thresholds,
            dummy if dh is None else dh, dummy if dw is None else dw, N, V, H, hidden.stride(0),
            weight.stride(0), float(softcap or 0.0), HAS_SOFTCAP=softcap is not None,
            FILTER=thresholds is not None, COMPUTE_DH=dh is not None, COMPUTE_DW=dw is not None,
            GROUP_N=GROUP_N, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
            DOT_PRECISION=dot_precision(hidden.dtype), num_warps=warps, num_stages=stages)

    scratch = []  # the tuner's trial runs (POLYFAST_AUTOTUNE=1) accumulate into copies

    def trial(cfg):
        if not scratch:
            scratch.extend(None if b is None else torch.empty_like(b) for b in (dh, dw))
        launch(cfg, *scratch)

    key = (N // 1024, H, V, dh is not None, dw is not None)
    launch(launch_config("bwd", hidden.device, hidden.dtype, key, trial), dh, dw)


def backward(hidden, weight, targets, g, ce, lse, zt, *, softcap, ignore_index, need_h, need_w,
             dtypes, H, filter_eps=0.0):
    """Gradients of sum_t g_t * CE_t with respect to hidden (N, Hp) and weight (V, Hp) as the
    forward launched them, from its per-row CE, lse and target logit: (d_hidden | None,
    d_weight | None), cut back to the first ``H`` columns, in ``dtypes``."""
    N, Hp = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    # the target column in fp32: g * (p_y - 1) * softcap'(z_y), with p_y - 1 = expm1(-CE)
    # accurate however close p_y is to 1 (CE itself came from log1p); NaN on a bad target's row
    coef = g * torch.expm1(-ce) * softcap_grad(zt, softcap)
    # the filter's per-row threshold: filter_eps x the row's off-target mass 1 - p_y = -expm1(-CE)
    thresholds = (-filter_eps * torch.expm1(-ce)).contiguous() if filter_eps > 0 else None
    _, _, y = target_rows(targets, ignore_index, V)
    dh = torch.zeros(N, Hp, device=device, dtype=torch.float32) if need_h else None
    dw = buf = hc = None
    slab = V
    if need_w:
        # d_weight slab by slab: an fp32 buffer of ``slab`` rows (+ one that collects the target
        # terms of rows whose target lies outside the slab), written out in the weight's dtype
        slab = bwd_slab_rows(V, Hp)
        dw = torch.empty(V, H, device=device, dtype=dtypes[1])
        buf = torch.empty(slab + 1, Hp, device=device, dtype=torch.float32)
        hc = hidden.float() * coef[:, None]  # (N, Hp): the target column's d_weight rows
    for v0 in range(0, V, slab):
        v1 = min(v0 + slab, V)
        if buf is not None:
            buf.zero_()
        launch_bwd(hidden, weight[v0:v1], targets - v0 if v0 else targets, lse, g, softcap, dh,
                   buf, thresholds)
        if buf is not None:
            buf.index_add_(0, torch.where((y >= v0) & (y < v1), y - v0, slab), hc)
            dw[v0:v1] = buf[:v1 - v0, :H]
    if need_h:
        dh += coef[:, None] * weight.index_select(0, y).float()
        dh = dh[:, :H].to(dtypes[0]).contiguous()
    return dh, dw
