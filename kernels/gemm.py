"""The "gemm" backend of linear cross-entropy: the head's products as cuBLAS GEMMs over vocabulary
chunks of C columns (an (N, C) fp32 logit chunk of at most GEMM_CHUNK_ELEMENTS: C = 8192 at
N = 16384), Triton for the elementwise part. What "auto" runs on CUDA for training at real head
shapes (``cost_model``).

    forward, per chunk:  z = h @ W_c^T into fp32 (torch.mm with out_dtype, 16-bit operands on the
                         tensor cores); ``chunk_stats_kernel`` folds it into the running per-row
                         (max, off-target sum-exp, target logit), merged into CE as in the fused
                         forward
    backward, per chunk: recompute z; ``chunk_grad_kernel`` turns it into dl = g * softmax *
                         softcap' in the operands' dtype (the target column from expm1(-CE), no
                         cancellation); d_hidden += dl @ W_c (an fp32 accumulator, added in the
                         GEMM's epilogue: addmm with out_dtype) and d_weight[chunk] = dl^T @ h,
                         complete in one GEMM (fp32 accumulation over all N rows) and written once
                         in the weight's dtype: no atomics, no (V, H) fp32 buffer

Its time does not depend on the data. The GEMMs compute the ignored rows too (no host sync to
count them), so callers send only the rows they score (``polyfast.data.packing.ScoredTokens``).

Shapes: hidden (N, H), weight (V, H) contiguous, of the compute dtype; targets (N,) int64.
"""

from __future__ import annotations

import torch

from .checks import IGNORE_INDEX
from .configs import elementwise_config
from .triton_helpers import (HAS_TRITON, apply_softcap, empty_stats, fold_stats, merge_stats,
                             softcap_chain)

# fp32 logits per vocabulary chunk (elements): 512 MiB, 8192 columns at N = 16384, few enough
# chunks that re-reading h and the d_hidden updates stay cheap
GEMM_CHUNK_ELEMENTS = 1 << 27

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def chunk_stats_kernel(z_ptr, stride_z, y_ptr, m_ptr, s_ptr, zt_ptr, N, C, v0, softcap,
                           IGNORE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # forward: fold one vocabulary chunk of fp32 logits z (N, C) (columns v0 .. v0+C-1 of
        # the vocabulary) into the running per-row (max, off-target sum-exp, target logit);
        # ignored rows read nothing
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        y = tl.load(y_ptr + rows, mask=row_ok, other=IGNORE)
        active = row_ok & (y != IGNORE)
        if tl.max(active.to(tl.int32), axis=0) > 0:
            yc = tl.where(active, y - v0, -1)  # the target's column in this chunk
            m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
            s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
            zt = tl.load(zt_ptr + rows, mask=row_ok, other=0.0)
            base = z_ptr + rows[:, None].to(tl.int64) * stride_z
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                col_ok = cols < C
                z = tl.load(base + cols[None, :], mask=active[:, None] & col_ok[None, :],
                            other=0.0)
                z = tl.where(col_ok[None, :], apply_softcap(z, softcap, HAS_SOFTCAP),
                             float("-inf"))
                is_target = (cols[None, :] == yc[:, None]) & col_ok[None, :]
                m, s, zt = fold_stats(z, is_target, m, s, zt)
            tl.store(m_ptr + rows, m, mask=active)
            tl.store(s_ptr + rows, s, mask=active)
            tl.store(zt_ptr + rows, zt, mask=active)

    @triton.jit
    def chunk_grad_kernel(z_ptr, stride_z, dl_ptr, stride_dl, y_ptr, lse_ptr, g_ptr, tcoef_ptr,
                          N, C, v0, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        # backward: one vocabulary chunk of fp32 logits z (N, C) -> the weighted softmax gradient
        # dl (N, C) in the operands' dtype: g * softmax * softcap', and on the target column
        # g * (p_y - 1) * softcap' with p_y - 1 = expm1(-CE) from tcoef (no cancellation)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = rows < N
        col_ok = cols < C
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        active = row_ok & (g != 0.0)
        ok = active[:, None] & col_ok[None, :]
        lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
        tcoef = tl.load(tcoef_ptr + rows, mask=active, other=0.0)
        yc = tl.load(y_ptr + rows, mask=row_ok, other=-1) - v0
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], mask=ok,
                    other=0.0)
        z = apply_softcap(z, softcap, HAS_SOFTCAP)
        dl = tl.where(cols[None, :] == yc[:, None], tcoef[:, None],
                      tl.exp(z - lse[:, None]) * g[:, None])
        if HAS_SOFTCAP:
            dl = softcap_chain(dl, z, softcap)
        dl = tl.where(ok, dl, 0.0)
        tl.store(dl_ptr + rows[:, None].to(tl.int64) * stride_dl + cols[None, :],
                 dl.to(dl_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# the argument types the launchers pass (sizes and strides: i32), for bench.compile_check
_CHUNK_TYPES = {"z_ptr": "*fp32", "dl_ptr": "*operand", "y_ptr": "*i64", "m_ptr": "*fp32",
                "s_ptr": "*fp32", "zt_ptr": "*fp32", "lse_ptr": "*fp32", "g_ptr": "*fp32",
                "tcoef_ptr": "*fp32", "softcap": "fp32"}
SIGNATURES = {"gemm.stats": {"types": _CHUNK_TYPES, "constexprs": lambda v: {"IGNORE": IGNORE_INDEX}},
              "gemm.grad": {"types": _CHUNK_TYPES, "constexprs": lambda v: {}}}

_OUT_DTYPE_WORKS: dict = {}  # "mm" / "addmm" -> whether its out_dtype= form works on CUDA


def mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, out=None) -> torch.Tensor:
    """a @ b with fp32 accumulation, rounded once to ``out_dtype`` (into ``out`` when given).
    16-bit operands with an fp32 result use torch.mm(out_dtype=) on CUDA (torch >= 2.8), else a
    16-bit product upcast (one more rounding); CPU products run in fp32 (its 16-bit matmuls
    round their output)."""
    if a.dtype == out_dtype:
        return torch.mm(a, b, out=out)
    if a.device.type != "cuda":
        r = torch.mm(a.float(), b.float())
    elif _OUT_DTYPE_WORKS.get("mm", True):
        try:
            r = torch.mm(a, b, out_dtype=out_dtype)
            _OUT_DTYPE_WORKS["mm"] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_WORKS["mm"] = False
            r = torch.mm(a, b)
    else:
        r = torch.mm(a, b)
    return r.to(out_dtype) if out is None else out.copy_(r)


def addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b for an fp32 accumulator and operands of the compute dtype: on CUDA one cuBLAS
    call whose epilogue adds acc (torch.addmm(out_dtype=), torch >= 2.8), else a product then an
    add. Returns the new accumulator (maybe acc itself)."""
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if a.device.type == "cuda" and _OUT_DTYPE_WORKS.get("addmm", True):
        try:
            out = torch.addmm(acc, a, b, out_dtype=acc.dtype)
            _OUT_DTYPE_WORKS["addmm"] = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_WORKS["addmm"] = False
    return acc.add_(mm(a, b, acc.dtype))


def gemm_chunk_cols(N: int, V: int) -> int:
    """Vocabulary columns per chunk: an (N, C) fp32 logit chunk of at most GEMM_CHUNK_ELEMENTS,
    C a multiple of 256 (at least 256, at most V)."""
    c = max(256, GEMM_CHUNK_ELEMENTS // max(N, 1) // 256 * 256)
    return max(1, min(c, V))


def forward(hidden, weight, targets, softcap, ignore_index):
    """Per vocabulary chunk, fp32 logits z = h @ W_c^T (cuBLAS) folded into running per-row
    statistics by ``chunk_stats_kernel``; returns ``merge_stats``' (CE, lse, target logit)."""
    N, V = hidden.shape[0], weight.shape[0]
    device = hidden.device
    if N == 0:
        return empty_stats(device)
    m = torch.full((1, N), float("-inf"), device=device, dtype=torch.float32)
    s = torch.zeros_like(m)
    zt = torch.zeros_like(m)
    C = gemm_chunk_cols(N, V)
    br, bc, warps = elementwise_config("stats", device, N)
    for v0 in range(0, V, C):
        z = mm(hidden, weight[v0:v0 + C].T, torch.float32)  # (N, c) fp32
        chunk_stats_kernel[(triton.cdiv(N, br),)](
            z, z.stride(0), targets, m, s, zt, N, z.shape[1], v0, float(softcap or 0.0),
            IGNORE=ignore_index, HAS_SOFTCAP=softcap is not None, BLOCK_R=br, BLOCK_C=bc,
            num_warps=warps)
        del z
    return merge_stats(m, s, zt, targets, ignore_index, V)


def backward(hidden, weight, targets, g, ce, lse, zt, *, softcap, ignore_index, need_h, need_w,
             dtypes, H, filter_eps=0.0):
    """Per vocabulary chunk: recompute the fp32 logits (cuBLAS), turn them into dl = g * (softmax
    - onehot) * softcap' in the operands' dtype (``chunk_grad_kernel``), then d_hidden += dl @ W_c
    (fp32 accumulator) and d_weight[chunk] = dl^T @ h. Same arguments and result as
    ``fused_bwd.backward`` (``filter_eps`` unused: the GEMMs do every product)."""
    N, Hp = hidden.shape  # Hp > H when the caller padded the operands (the joint pass)
    V = weight.shape[0]
    device = hidden.device
    # the target column before the softcap factor (which the kernel applies): g * (p_y - 1)
    coef = (g * torch.expm1(-ce)).contiguous()
    dh = torch.zeros(N, Hp, device=device, dtype=torch.float32) if need_h else None
    dw = torch.empty(V, Hp, device=device, dtype=dtypes[1]) if need_w else None
    if N > 0 and (need_h or need_w):
        dh = _chunks(hidden, weight, targets, g, coef, lse, softcap, dh, dw)
    if dw is not None and N == 0:
        dw.zero_()
    dh = None if dh is None else dh[:, :H].to(dtypes[0]).contiguous()
    return dh, None if dw is None else dw[:, :H].contiguous()


def _chunks(hidden, weight, targets, g, coef, lse, softcap, dh, dw):
    # the backward's chunk loop: dh (N, Hp) fp32 accumulates (returned), dw (V, Hp) is written
    # chunk by chunk
    N, V = hidden.shape[0], weight.shape[0]
    C = gemm_chunk_cols(N, V)
    dl = torch.empty(N, C, device=hidden.device, dtype=hidden.dtype)
    br, bc, warps = elementwise_config("grad", hidden.device, N)
    for v0 in range(0, V, C):
        wc = weight[v0:v0 + C]  # (c, Hp)
        z = mm(hidden, wc.T, torch.float32)  # (N, c) fp32
        c = z.shape[1]
        dlc = dl[:, :c]
        chunk_grad_kernel[(triton.cdiv(N, br), triton.cdiv(c, bc))](
            z, z.stride(0), dlc, dlc.stride(0), targets, lse, g, coef, N, c, v0,
            float(softcap or 0.0), HAS_SOFTCAP=softcap is not None, BLOCK_R=br, BLOCK_C=bc,
            num_warps=warps)
        del z
        if dh is not None:
            dh = addmm_f32(dh, dlc, wc)  # (a new tensor when cuBLAS adds in its epilogue)
        if dw is not None:
            mm(dlc.T, hidden, dw.dtype, out=dw[v0:v0 + c])
    return dh

