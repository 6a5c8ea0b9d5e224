"""The fused forward of linear cross-entropy: logits built in SRAM, never written (the Cut
Cross-Entropy approach), for the "triton" backend.

    grid (row blocks, vocabulary splits)
    each program: for each (BLOCK_V, H) slice of its split of the head weight W
        z = softcap(h_blk @ W_slice^T)           tl.dot, fp32 accumulate, H in BLOCK_H steps
        fold z into (running max, off-target sum-exp, target logit) per row

Splitting the vocabulary gives enough programs when N is small (N / BLOCK_N row blocks alone cannot
fill an H100's 132 SMs); the splits' partial statistics are merged by a few (S, N) torch ops
(``triton_helpers.merge_stats``), without a host sync. Row blocks whose rows are all ignored skip
all work.

Shapes: hidden (N, Hp), weight (V, Hp) padded (``configs.padded``), targets (N,) int64.
"""

from __future__ import annotations

import torch

from .checks import IGNORE_INDEX, dot_precision
from .configs import launch_config, num_sms
from .triton_helpers import HAS_TRITON, empty_stats, merge_stats, row_stats

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def fwd_kernel(h_ptr, w_ptr, y_ptr, m_ptr, s_ptr, zt_ptr, N, V, H, stride_h, stride_w,
                   v_per_split, softcap, IGNORE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
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
            m, s, zt = row_stats(h_ptr, w_ptr, y, rows, row_ok, v_start,
                                 tl.minimum(v_start + v_per_split, V), H, stride_h, stride_w,
                                 softcap, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        out = pid_s * N + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(zt_ptr + out, zt, mask=row_ok)


# the argument types the launcher passes (sizes and strides: i32), for bench.compile_check
SIGNATURES = {"linear_ce.fwd": {
    "types": {"h_ptr": "*operand", "w_ptr": "*operand", "y_ptr": "*i64", "m_ptr": "*fp32",
              "s_ptr": "*fp32", "zt_ptr": "*fp32", "v_per_split": "i32", "softcap": "fp32"},
    "constexprs": lambda v: {"IGNORE": IGNORE_INDEX}}}


def launch_fwd(hidden, weight, targets, softcap, ignore_index, num_splits=None):
    """Per-row (CE, lse, target logit), each (N,) fp32 (``merge_stats``). hidden (N, Hp) and
    weight (V, Hp) as ``configs.padded`` makes them, of the compute dtype; targets (N,) int64,
    contiguous. ``num_splits`` forces the vocabulary split count (tests)."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    if N == 0:
        return empty_stats(device)

    def run(cfg, splits_override=num_splits):
        bn, bv, bh, warps, stages = cfg
        n_blocks = triton.cdiv(N, bn)
        splits = splits_override or max(1, min(triton.cdiv(V, bv),
                                                triton.cdiv(4 * num_sms(device), n_blocks)))
        v_per_split = triton.cdiv(triton.cdiv(V, splits), bv) * bv
        splits = triton.cdiv(V, v_per_split)
        m = torch.empty(splits, N, device=device, dtype=torch.float32)
        s = torch.empty_like(m)
        zt = torch.empty_like(m)
        fwd_kernel[(n_blocks, splits)](
            hidden, weight, targets, m, s, zt, N, V, H, hidden.stride(0), weight.stride(0),
            v_per_split, float(softcap or 0.0), IGNORE=ignore_index,
            HAS_SOFTCAP=softcap is not None, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
            DOT_PRECISION=dot_precision(hidden.dtype), num_warps=warps, num_stages=stages)
        return m, s, zt

    cfg = launch_config("fwd", device, hidden.dtype, (N // 1024, H, V), run)
    return merge_stats(*run(cfg), targets, ignore_index, V)
