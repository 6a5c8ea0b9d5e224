"""Pieces the fused kernels share: the @triton.jit helpers that build and reduce logit tiles in
SRAM, and the torch merge of the per-row statistics the kernels leave behind.

A forward pass over part of the vocabulary leaves, per row, a running max m, the sum-exp of the
off-target logits relative to m and the target logit z_y; ``merge_stats`` turns the parts into

    CE = lse - z_y = log(1 + S exp(M - z_y)) = log1p(r)

which has no cancellation when p(target) -> 1 (where lse - z_y would lose all its digits in fp32).
"""

from __future__ import annotations

import torch

from .checks import target_rows

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency, but keep the CPU path importable
    triton, tl, HAS_TRITON = None, None, False


if HAS_TRITON:

    @triton.jit
    def tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
        # (BLOCK_N, BLOCK_V) fp32 tile of hidden[rows] @ weight[cols]^T, looping over H (a
        # multiple of BLOCK_H: the launchers pad it)
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hk = h0 + tl.arange(0, BLOCK_H)
            a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + hk[None, :],
                        mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + hk[None, :],
                        mask=col_ok[:, None], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def apply_softcap(z, softcap, HAS_SOFTCAP: tl.constexpr):
        # c * tanh(z / c); a launch with HAS_SOFTCAP may pass c = 0 for "no softcap" (joint pass)
        if HAS_SOFTCAP:
            c = tl.where(softcap > 0, softcap, 1.0)
            z = tl.where(softcap > 0, c * tanh(z / c), z)
        return z

    @triton.jit
    def softcap_chain(dl, z, softcap):
        # dl * d softcap / d logit, from the capped logit z: dl * (1 - (z / c)^2)
        zc = z / softcap
        return dl * (1.0 - zc * zc)

    @triton.jit
    def fold_stats(z, is_target, m, s, zt):
        # fold a (rows, cols) tile of logits (-inf where not a column) into the running max m,
        # the off-target sum-exp s relative to m and the target logit zt
        m_new = tl.maximum(m, tl.max(z, axis=1))
        e = tl.where(is_target, 0.0, tl.exp(z - m_new[:, None]))
        s = s * tl.exp(m - m_new) + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        return m_new, s, zt

    @triton.jit
    def row_stats(h_ptr, w_ptr, y, rows, row_ok, v_start, v_end, H, stride_h, stride_w, softcap,
                  HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # over vocabulary columns [v_start, v_end): running max m, the sum-exp of the off-target
        # logits relative to m, and the target logit (0 when the target is outside the range)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_end
            z = logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                           BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
            z = apply_softcap(z, softcap, HAS_SOFTCAP)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            m, s, zt = fold_stats(z, cols[None, :] == y[:, None], m, s, zt)
        return m, s, zt


if HAS_TRITON:

    @triton.jit
    def row_stats_shared(h0_ptr, h1_ptr, w_ptr, y, rows, row_ok, v_start, v_end, H, stride_h0,
                         stride_h1, stride_w, cap0, cap1, HAS_SOFTCAP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
        # ``row_stats`` of two hidden states against one head (LoRA's policy and its
        # adapters-off reference): each (BLOCK_V, BLOCK_H) tile of the head is loaded once and
        # multiplied with both row blocks
        m0 = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        m1, s1, zt1 = m0, s0, zt0
        for v0 in range(v_start, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_end
            acc0 = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            acc1 = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_H):
                hk = k0 + tl.arange(0, BLOCK_H)
                b = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + hk[None, :],
                            mask=col_ok[:, None], other=0.0)
                a0 = tl.load(h0_ptr + rows[:, None].to(tl.int64) * stride_h0 + hk[None, :],
                             mask=row_ok[:, None], other=0.0)
                a1 = tl.load(h1_ptr + rows[:, None].to(tl.int64) * stride_h1 + hk[None, :],
                             mask=row_ok[:, None], other=0.0)
                bt = tl.trans(b)
                acc0 = tl.dot(a0, bt, acc0, input_precision=DOT_PRECISION)
                acc1 = tl.dot(a1, bt, acc1, input_precision=DOT_PRECISION)
            is_target = cols[None, :] == y[:, None]
            z0 = tl.where(col_ok[None, :], apply_softcap(acc0, cap0, HAS_SOFTCAP), float("-inf"))
            m0, s0, zt0 = fold_stats(z0, is_target, m0, s0, zt0)
            z1 = tl.where(col_ok[None, :], apply_softcap(acc1, cap1, HAS_SOFTCAP), float("-inf"))
            m1, s1, zt1 = fold_stats(z1, is_target, m1, s1, zt1)
        return m0, s0, zt0, m1, s1, zt1


def merge_stats(m, s, zt, targets, ignore_index, V):
    """Per-row (CE, lse, target logit), each (N,) fp32, from the (max, off-target sum-exp, target
    logit) of P vocabulary parts, each (P, N): M = max_p m_p, S = sum_p s_p exp(m_p - M) and
    CE = log1p(S exp(M - z_y)). 0 on ignored rows, NaN on rows whose target is out of range."""
    scored_rows, in_range, _ = target_rows(targets, ignore_index, V)
    M = m.max(0).values
    scored = scored_rows & torch.isfinite(M)
    M = torch.where(scored, M, 0.0)
    S = (s * torch.exp(m - M)).sum(0)
    zt = torch.where(scored, zt.sum(0), 0.0)
    gap = M - zt  # >= 0
    ce = torch.where(gap < 30.0, torch.log1p(S * torch.exp(gap.clamp(max=30.0))),
                     gap + torch.log(S + torch.exp(-gap)))
    ce = torch.where(scored, ce, 0.0)
    ce = torch.where(scored_rows & ~in_range, float("nan"), ce)  # a bad target poisons its row
    return ce, zt + ce, zt


def empty_stats(device) -> tuple:
    """``merge_stats``' (CE, lse, target logit) of zero rows."""
    empty = torch.zeros(0, device=device, dtype=torch.float32)
    return empty, empty.clone(), empty.clone()
