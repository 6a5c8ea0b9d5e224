"""Head projection + (bucket-)weighted token cross-entropy, without materialising (N, V) logits.

    z_t   = softcap(h_t @ W^T)            softcap(x) = c * tanh(x / c), or x when c is None
    CE_t  = logsumexp(z_t) - z_t[y_t]
    loss  = sum_t w_t * CE_t              (reduction="sum";  "none" returns w_t * CE_t per token)

Rows with y_t == ignore_index contribute nothing (CE_t = 0). The gradient of row t is

    dz_t = g_t * (softmax(z_t) - onehot(y_t)),     g_t = w_t * grad_out(_t)
    dl_t = dz_t * (1 - (z_t / c)^2)                (softcap chain rule)
    dh_t = dl_t @ W,   dW = sum_t dl_t^T h_t,   dw_t = grad_out(_t) * CE_t

Compute dtype: the head's matmuls run in the training compute dtype, decided per call by
``compute_dtype``: under autocast its dtype (bf16 on CUDA with ``model.dtype: auto``, whose hidden
states and head are fp32); otherwise the inputs' dtype, or the 16-bit one of a 16-bit / fp32 mix.
16-bit operands go through the tensor cores with fp32 accumulation; fp32 operands use true fp32
products, or TF32 when torch allows it (``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
``train.tf32`` in a config). Softmax statistics and gradient buffers are always fp32, and
gradients come back in each input's own dtype (an fp32 head gets its fp32 gradient unrounded).

Backends (chosen per call, never by swapping symbols at import):
- "gemm": vocabulary chunks through cuBLAS, Triton for the elementwise part (below);
- "triton": the fused kernels below, with the gradient filter;
- "torch": the chunked twin: rows are processed in chunks whose logits fit a fixed budget; the
  forward keeps only the per-row log-sum-exp, the backward recomputes each chunk's logits. Peak extra
  memory is O(chunk * V) instead of O(N * V). Ignored rows are dropped before any matmul. The CPU
  production path;
- "reference": full logits in fp32 (fp64 for fp64 inputs) whatever the compute dtype, autograd
  through torch ops: the oracle of tests and benchmarks;
- "auto": "torch" off CUDA; on CUDA the fused backend the cost model (``predict``) says is faster
  for the shape, forward + backward (or forward alone when no input needs a gradient), with the
  "triton" backward taken as unfiltered: its filter rate depends on the data. At the shapes of
  real heads that is "gemm" with a backward and "triton" for a frozen model's forward.
("gemm" and "triton" run on CUDA; on a CPU only under TRITON_INTERPRET=1, for tests.)

The "gemm" backend: the head's products as cuBLAS GEMMs over vocabulary chunks of C columns (an
(N, C) fp32 logit chunk of at most GEMM_CHUNK_ELEMENTS: C = 8192 at N = 16384):
- forward, per chunk: z = h @ W_c^T into fp32 (torch.mm with out_dtype, 16-bit operands on the
  tensor cores), then ``_chunk_stats_kernel`` folds the chunk into running per-row (max, off-target
  sum-exp, target logit), merged into CE as in the fused forward;
- backward, per chunk: recompute z, ``_chunk_grad_kernel`` turns it into dl = g * softmax *
  softcap' in the operands' dtype (the target column from expm1(-CE), no cancellation), then
  d_hidden += dl @ W_c (an fp32 accumulator, added in the GEMM's epilogue: addmm with out_dtype)
  and d_weight[chunk] = dl^T @ h, complete in one GEMM (its fp32 accumulation is over all N rows)
  and written once in the weight's dtype: no atomics, no (V, H) fp32 buffer.
  Cost (``predict``): 8NHV FLOPs (four GEMMs of 2NHV), plus the elementwise passes over the fp32
  logits: 4 bytes read per logit in the forward, 4 read and 2 (bf16) written in the backward, plus
  the GEMMs' own traffic (h once per chunk, the logits written, dl read twice). At N = 16384,
  H = 2048, V = 248320 in bf16: 66.7 TFLOP = 67.4 ms at 989 TFLOP/s, and ~12 ms of HBM-bound
  elementwise work at 3.35 TB/s: 79.5 ms; memory = the fp32 logit chunk (512 MiB) + dl (256 MiB)
  + two fp32 d_hidden accumulators (256 MiB) + the bf16 gradients (1.08 GB): 2.16 GB. Its time
  does not depend on the data. The GEMMs compute the ignored rows too (no host sync to count them).

The fused Triton kernels (the Cut Cross-Entropy approach: recompute, never store logits). The
rows are first ordered scored-first (``_compaction``, an argsort on the device): ignored rows
(prompt tokens of a packed batch) fill whole row blocks at the end, which every kernel skips.
- forward, grid (row blocks, vocabulary splits): each program multiplies its rows' hidden block by
  successive (BLOCK_V, H) slices of the head weight in SRAM (tl.dot, fp32 accumulate, looping over H
  in BLOCK_H steps), applies the softcap, and keeps an online max, the sum-exp of the off-target
  logits and the target logit; CE = log1p(S_off * exp(max - z_y)) then has no cancellation even
  when p(target) -> 1 (where lse - z_y would lose all its digits in fp32).
  Splitting the vocabulary gives enough programs when N is small (N / BLOCK_N row blocks alone
  cannot fill an H100's 132 SMs); the partial (max, sum-exp, target logit) of the splits are merged
  by a few (S, N) torch ops, without a host sync. Row blocks whose rows are all ignored skip all
  work.
- backward, a 1-D grid in grouped order (GROUP_N row blocks sweep the vocabulary together, so
  their d_hidden tiles and the W tiles they share stay in L2): each program recomputes its
  (BLOCK_N, BLOCK_V) logit tile and the softmax p; if any p in the tile reaches its row's filter
  threshold (filter_eps x the row's off-target mass 1 - p_y; default filter_eps 2^-12 for 16-bit
  operands, 0 = exact, the default for fp32), it forms g * p * softcap' and adds its contributions
  to d_hidden (tile @ W_blk) and d_weight (tile^T @ h_blk) with fp32 atomics, H chunk by H chunk;
  else it skips the products. Relative to the row's off-target mass, a skipped tile holds
  probabilities that are each negligible next to the row's gradient scale: rows spread over the
  vocabulary (uniform-looking) lose nearly all their tiles to the filter, peaked rows keep the
  tiles of their likely tokens, and a row with p_y -> 1 keeps its small off-target mass (an
  absolute threshold would drop it whole). Atomics, rather than a split reduction, need only one
  recompute of each tile and one fp32 buffer per gradient ((N, H) and (V, H)). Rows without
  gradient contribute exact zeros (their logits are never exponentiated against a log-sum-exp they
  do not have); frozen inputs (no requires_grad) get no atomics at all. Offsets are int64 (V * H
  and N * H may pass 2^31). d_weight is built slab by slab (one launch per BWD_SLAB_ELEMENTS-sized
  slab of head rows, 16384 rows at H = 2048): each slab's fp32 buffer gets the kernel's atomics
  and the target column's terms, then is written out in the weight's dtype, so no (V, H) fp32
  buffer exists; d_hidden's fp32 (N, H) buffer accumulates across the slabs.
  The target column is left out of the tile and applied outside the kernel in fp32, with
  p_y - 1 = expm1(-CE) (a gather of W[y] and an index_add into d_weight), so a peaked
  distribution (p(target) = 0.999) keeps its gradient (p - 1 = -1e-3) with bf16 inputs.
  Cost (``predict``): 4NHV FLOPs for the two logit sweeps, plus, for the share f of tiles that
  pass the filter, 4NHV FLOPs of products and 4NHV (1/BLOCK_N + 1/BLOCK_V) bytes of fp32 atomics
  (521 GB at the shape above with f = 1: ~223 ms; 33.7 ms with f = 0); memory = the compacted
  copy of h, the fp32 d_hidden and target-column buffers, the 128 MiB slab and the 16-bit
  gradients: 1.55 GB there.

Bad ids: a target outside [0, V) that is not ignore_index is an error. On CPU tensors (and
everywhere with POLYFAST_CHECK_IDS=1) it raises a ValueError naming the row; on CUDA the check
would cost a host sync per call, so by default the kernels instead poison the row's loss and
gradients with NaN on the device (never a finite wrong value, never an out-of-bounds access).
POLYFAST_CHECK_IDS=0 turns the host check off everywhere.

Block sizes: a pinned config per GPU family, kernel and operand width (``_CONFIGS``), each one
checked for register spills, shared memory and tensor-core instructions by ``python -m
polyfast.bench.compile_check`` (sm_90, sm_80 and sm_86, no GPU needed); POLYFAST_AUTOTUNE=1 times a
few candidates on first use of each shape instead and keeps the fastest. H reaches the kernels
padded to a multiple of the largest H block (``padded``; real models' hidden sizes already are), so
the kernels need no H masks and every row load is 16-byte aligned.

Shapes: hidden (N, H), weight (V, H), targets (N,) int, token_weights (N,) float or None.
"""

from __future__ import annotations

import contextlib
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
# fp32 logits per vocabulary chunk of the "gemm" backend (elements): 512 MiB, 8192 columns at
# N = 16384, few enough chunks that re-reading h and the d_hidden updates stay cheap
GEMM_CHUNK_ELEMENTS = 1 << 27
DEFAULT_FILTER_EPS = 2.0 ** -12
# fp32 d_weight values per launch of the fused backward (a slab of head rows): 128 MiB
BWD_SLAB_ELEMENTS = 1 << 25
GROUP_N = 8  # row blocks that sweep the vocabulary together in the fused backward
# (BLOCK_R, BLOCK_C, num_warps) of the "gemm" backend's elementwise kernels on a GPU
ELEMENTWISE_CONFIGS = {"stats": (16, 256, 8), "grad": (8, 256, 4)}
BACKENDS = ("auto", "triton", "gemm", "torch", "reference")
REDUCTIONS = ("sum", "none")
IGNORE_INDEX = -100
SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def _softcap(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return z if softcap is None else softcap * torch.tanh(z / softcap)


# ---------------------------------------------------------------------------------------------
# compute dtype and input checks


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
        raise ValueError("hidden states and head weights mix bfloat16 and float16; cast one of them")
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
    """The ops below pick their compute dtype themselves (``compute_dtype``); autocast must not
    recast their internal matmuls or fp32 accumulations."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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


def _check(hidden, weight, targets, token_weights, reduction, ignore_index):
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


def _grad_dtypes(hidden, weight, token_weights):
    # the dtypes the gradients go back in: each input's own
    return hidden.dtype, weight.dtype, None if token_weights is None else token_weights.dtype


def _target_rows(targets, ignore_index, V):
    """(scored, in_range, safe): the rows to score, those whose target is a real class, and the
    targets with every other row set to 0 (a safe gather index)."""
    scored = targets != ignore_index
    in_range = scored & (targets >= 0) & (targets < V)
    return scored, in_range, torch.where(in_range, targets, 0).long()


# ---------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
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
    def _apply_softcap(z, softcap, HAS_SOFTCAP: tl.constexpr):
        # c * tanh(z / c); a launch with HAS_SOFTCAP may pass c = 0 for "no softcap" (joint pass)
        if HAS_SOFTCAP:
            c = tl.where(softcap > 0, softcap, 1.0)
            z = tl.where(softcap > 0, c * _tanh(z / c), z)
        return z

    @triton.jit
    def _fold_stats(z, is_target, m, s, zt):
        # fold a (rows, cols) tile of logits (-inf where not a column) into the running max m,
        # the off-target sum-exp s relative to m and the target logit zt
        m_new = tl.maximum(m, tl.max(z, axis=1))
        e = tl.where(is_target, 0.0, tl.exp(z - m_new[:, None]))
        s = s * tl.exp(m - m_new) + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        return m_new, s, zt

    @triton.jit
    def _row_stats(h_ptr, w_ptr, y, rows, row_ok, v_start, v_end, H, stride_h, stride_w, softcap,
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
            z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                            BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
            z = _apply_softcap(z, softcap, HAS_SOFTCAP)
            z = tl.where(col_ok[None, :], z, float("-inf"))
            m, s, zt = _fold_stats(z, cols[None, :] == y[:, None], m, s, zt)
        return m, s, zt

    @triton.jit
    def _fwd_kernel(h_ptr, w_ptr, y_ptr, m_ptr, s_ptr, zt_ptr, N, V, H, stride_h, stride_w,
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
            m, s, zt = _row_stats(h_ptr, w_ptr, y, rows, row_ok, v_start,
                                  tl.minimum(v_start + v_per_split, V), H, stride_h, stride_w,
                                  softcap, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        out = pid_s * N + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(zt_ptr + out, zt, mask=row_ok)

    @triton.jit
    def _bwd_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, thr_ptr, dh_ptr, dw_ptr, N, V, H,
                    stride_h, stride_w, softcap, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
                    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, GROUP_N: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
        # off-target part of the gradient: d_hidden (N, H) += dl @ W, d_weight (V, H) += dl^T @ h,
        # dl = g * softmax(z) * softcap'(z) with the target column left out (done in fp32 outside);
        # both fp32 buffers, by atomics. A 1-D grid in grouped order: GROUP_N row blocks sweep the
        # vocabulary together, so their d_hidden tiles (and the W tiles they share) stay in L2.
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
            z = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                            BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
            z = _apply_softcap(z, softcap, HAS_SOFTCAP)
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
                    zc = z / softcap
                    dl = dl * (1.0 - zc * zc)
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

    @triton.jit
    def _chunk_stats_kernel(z_ptr, stride_z, y_ptr, m_ptr, s_ptr, zt_ptr, N, C, v0, softcap,
                            IGNORE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # "gemm" forward: fold one vocabulary chunk of fp32 logits z (N, C) (columns v0 .. v0+C-1
        # of the vocabulary) into the running per-row (max, off-target sum-exp, target logit);
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
                z = tl.where(col_ok[None, :], _apply_softcap(z, softcap, HAS_SOFTCAP),
                             float("-inf"))
                is_target = (cols[None, :] == yc[:, None]) & col_ok[None, :]
                m, s, zt = _fold_stats(z, is_target, m, s, zt)
            tl.store(m_ptr + rows, m, mask=active)
            tl.store(s_ptr + rows, s, mask=active)
            tl.store(zt_ptr + rows, zt, mask=active)

    @triton.jit
    def _chunk_grad_kernel(z_ptr, stride_z, dl_ptr, stride_dl, y_ptr, lse_ptr, g_ptr, tcoef_ptr,
                           N, C, v0, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        # "gemm" backward: one vocabulary chunk of fp32 logits z (N, C) -> the weighted softmax
        # gradient dl (N, C) in the operands' dtype: g * softmax * softcap', and on the target
        # column g * (p_y - 1) * softcap' with p_y - 1 = expm1(-CE) from tcoef (no cancellation)
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
        z = _apply_softcap(z, softcap, HAS_SOFTCAP)
        dl = tl.where(cols[None, :] == yc[:, None], tcoef[:, None],
                      tl.exp(z - lse[:, None]) * g[:, None])
        if HAS_SOFTCAP:
            zc = z / softcap
            dl = dl * (1.0 - zc * zc)
        dl = tl.where(ok, dl, 0.0)
        tl.store(dl_ptr + rows[:, None].to(tl.int64) * stride_dl + cols[None, :],
                 dl.to(dl_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# launchers

# Pinned configs: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) per GPU family, kernel
# ("fwd" / "bwd" here, "joint": joint_logprobs' forward) and operand width ("16": bf16 / fp16 on
# tensor cores; "32": fp32). Chosen with `python -m polyfast.bench.compile_check` for no register
# spills and shared memory within the architecture's limit (the fp32 ones are smaller: true fp32
# products unroll into FMA chains that spill at the 16-bit tile sizes).
_CONFIGS = {
    "hopper": {"fwd16": (128, 128, 32, 8, 4), "bwd16": (128, 128, 64, 8, 3),
               "joint16": (128, 64, 64, 8, 3),
               "fwd32": (64, 128, 32, 8, 2), "bwd32": (64, 64, 16, 8, 2),
               "joint32": (64, 128, 32, 8, 2)},
    "ampere": {"fwd16": (128, 128, 32, 8, 3), "bwd16": (128, 128, 32, 8, 2),
               "joint16": (128, 64, 64, 8, 3),
               "fwd32": (64, 128, 32, 8, 2), "bwd32": (64, 64, 32, 8, 2),
               "joint32": (64, 128, 32, 8, 2)},
    "other": {"fwd16": (64, 128, 32, 4, 2), "bwd16": (64, 64, 32, 4, 2),
              "joint16": (64, 64, 32, 8, 2),
              "fwd32": (64, 64, 32, 4, 2), "bwd32": (64, 64, 32, 8, 2),
              "joint32": (64, 64, 16, 8, 1)},
    "interpret": {k + w: (16, 32, 16, 1, 1) for k in ("fwd", "bwd", "joint") for w in ("16", "32")},
}
# the GPU architecture each family's configs are checked on (bench.compile_check)
FAMILY_ARCH = {"hopper": 90, "ampere": 80, "other": 86}
_AUTOTUNE_CANDIDATES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3),
                        (128, 128, 32, 8, 4), (64, 256, 32, 8, 3)]
_tuned: dict[tuple, tuple] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _family(device: torch.device) -> str:
    if device.type != "cuda":
        return "interpret"
    cap = torch.cuda.get_device_capability(device)
    return "hopper" if cap[0] == 9 else "ampere" if cap == (8, 0) else "other"


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def h_multiple(device: torch.device) -> int:
    """Hidden sizes reach the kernels padded to a multiple of this (the largest BLOCK_H a config
    or the autotuner may use on ``device``): the kernels need no H masks, and rows of a multiple of
    64 elements keep every load 16-byte aligned and vectorised. Real models' hidden sizes already
    are multiples of 64; only odd test shapes pay for a padded copy."""
    fam = _family(device)
    sizes = [c[2] for c in _CONFIGS[fam].values()]
    if fam != "interpret":
        sizes += [c[2] for c in _AUTOTUNE_CANDIDATES]
    return max(sizes)


def padded(x: torch.Tensor, dtype: torch.dtype, cols: int) -> torch.Tensor:
    """x (R, H) as a contiguous, 16-byte aligned (R, cols) tensor of ``dtype``, zero-padded on the
    right: x itself when it already is one, else one copy (a plain cast when no padding is due)."""
    if x.shape[1] == cols:
        out = x.to(dtype).contiguous()
        return out if out.data_ptr() % 16 == 0 else out.clone()  # a fresh tensor is aligned
    out = x.new_zeros((x.shape[0], cols), dtype=dtype)
    out[:, :x.shape[1]] = x
    return out


def padded_size(H: int, device: torch.device) -> int:
    m = h_multiple(device)
    return -(-H // m) * m


def config_key(kind: str, dtype: torch.dtype) -> str:
    """The ``_CONFIGS`` entry of a kernel kind ("fwd" / "bwd" / "joint") for operands of
    ``dtype``."""
    return kind + ("16" if dtype in SIXTEEN_BIT else "32")


def pinned_config(kind: str, device: torch.device, dtype: torch.dtype) -> tuple:
    return _CONFIGS[_family(device)][config_key(kind, dtype)]


def _config(kind: str, device: torch.device, dtype: torch.dtype, key: tuple, run) -> tuple:
    """The pinned config, or with POLYFAST_AUTOTUNE=1 the fastest of a few candidates, timed once
    per (kind, shape key) by ``run(config)``."""
    if device.type != "cuda" or os.environ.get("POLYFAST_AUTOTUNE", "0") in ("", "0"):
        return pinned_config(kind, device, dtype)
    full = (kind, device.index, dtype, *key)
    if full not in _tuned:
        from triton.testing import do_bench
        times = {}
        for cfg in _AUTOTUNE_CANDIDATES:
            try:
                times[cfg] = do_bench(lambda: run(cfg), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                continue
        _tuned[full] = min(times, key=times.get) if times else pinned_config(kind, device, dtype)
    return _tuned[full]


def _merge_stats(m, s, zt, targets, ignore_index, V):
    """Per-row (CE, lse, target logit), each (N,) fp32, from the (max, off-target sum-exp, target
    logit) of P vocabulary parts, each (P, N): M = max_p m_p, S = sum_p s_p exp(m_p - M) and
    CE = lse - z_y = log(1 + S exp(M - z_y)) = log1p(r), which has no cancellation when p_y -> 1.
    0 on ignored rows, NaN on rows whose target is out of range."""
    scored_rows, in_range, _ = _target_rows(targets, ignore_index, V)
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


def _empty_stats(N, device):
    empty = torch.zeros(N, device=device, dtype=torch.float32)
    return empty, empty.clone(), empty.clone()


def _launch_fwd(hidden, weight, targets, softcap, ignore_index, num_splits=None):
    """Per-row (CE, lse, target logit), each (N,) fp32 (see ``_merge_stats``). hidden (N, H) and
    weight (V, H) as ``padded`` makes them, of the compute dtype; targets (N,) int64, contiguous."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    if N == 0:
        return _empty_stats(0, device)

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
            v_per_split, float(softcap or 0.0), IGNORE=ignore_index,
            HAS_SOFTCAP=softcap is not None, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
            DOT_PRECISION=dot_precision(hidden.dtype), num_warps=warps, num_stages=stages)
        return m, s, zt

    cfg = _config("fwd", device, hidden.dtype, (N // 1024, H, V), run)
    return _merge_stats(*run(cfg), targets, ignore_index, V)


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


def _launch_bwd(hidden, weight, targets, lse, g, softcap, dh, dw, thresholds=None):
    """One launch of the fused backward over ``weight`` (Vs, H) (the head or a slab of it; targets
    relative to its first row): the off-target gradient contributions are added into the fp32
    buffers dh (N, H) and dw (>= Vs, H), either None when not wanted. ``thresholds`` (N,) fp32:
    the gradient filter's per-row probability threshold (None: exact)."""
    N, H = hidden.shape
    V = weight.shape[0]
    if N == 0 or (dh is None and dw is None):
        return

    def launch(cfg, dh, dw):
        bn, bv, bh, warps, stages = cfg
        dummy = lse  # a pointer the kernel never touches when a gradient is not computed
        _bwd_kernel[(triton.cdiv(N, bn) * triton.cdiv(V, bv),)](
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
    launch(_config("bwd", hidden.device, hidden.dtype, key, trial), dh, dw)


# ---------------------------------------------------------------------------------------------
# the "gemm" backend: vocabulary chunks through cuBLAS, Triton for the elementwise part

_OUT_DTYPE_WORKS: dict = {}  # "mm" / "addmm" -> whether its out_dtype= form works on CUDA


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, out=None) -> torch.Tensor:
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


def _addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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
    return acc.add_(_mm(a, b, acc.dtype))


def gemm_chunk_cols(N: int, V: int) -> int:
    """Vocabulary columns per chunk of the "gemm" backend: an (N, C) fp32 logit chunk of at most
    GEMM_CHUNK_ELEMENTS, C a multiple of 256 (at least 256, at most V)."""
    c = max(256, GEMM_CHUNK_ELEMENTS // max(N, 1) // 256 * 256)
    return max(1, min(c, V))


def _elementwise_config(kind: str, device: torch.device, N: int) -> tuple:
    # (BLOCK_R, BLOCK_C, num_warps); "stats" programs own whole rows: fewer rows per program
    # when N is small, so that the grid still covers the GPU
    if device.type != "cuda":  # the interpreter: few, large programs
        return 16, 64, 1
    if kind == "grad":
        return ELEMENTWISE_CONFIGS["grad"]
    br, bc, warps = ELEMENTWISE_CONFIGS["stats"]
    while br > 1 and triton.cdiv(N, br) < 4 * _num_sms(device):
        br //= 2
    return br, bc, warps


def _gemm_fwd(hidden, weight, targets, softcap, ignore_index):
    """The "gemm" forward: per vocabulary chunk, fp32 logits z = h @ W_c^T (cuBLAS) folded into
    running per-row statistics by ``_chunk_stats_kernel``; returns ``_merge_stats``' (CE, lse,
    target logit). hidden (N, H) and weight (V, H) contiguous, of the compute dtype."""
    N, V = hidden.shape[0], weight.shape[0]
    device = hidden.device
    if N == 0:
        return _empty_stats(0, device)
    m = torch.full((1, N), float("-inf"), device=device, dtype=torch.float32)
    s = torch.zeros_like(m)
    zt = torch.zeros_like(m)
    C = gemm_chunk_cols(N, V)
    br, bc, warps = _elementwise_config("stats", device, N)
    for v0 in range(0, V, C):
        z = _mm(hidden, weight[v0:v0 + C].T, torch.float32)  # (N, c) fp32
        _chunk_stats_kernel[(triton.cdiv(N, br),)](
            z, z.stride(0), targets, m, s, zt, N, z.shape[1], v0, float(softcap or 0.0),
            IGNORE=ignore_index, HAS_SOFTCAP=softcap is not None, BLOCK_R=br, BLOCK_C=bc,
            num_warps=warps)
        del z
    return _merge_stats(m, s, zt, targets, ignore_index, V)


def _gemm_bwd(hidden, weight, targets, g, tcoef, lse, softcap, need_h, need_w, dtypes):
    """The "gemm" backward: per vocabulary chunk, recompute the fp32 logits (cuBLAS), turn them
    into dl = g * (softmax - onehot) * softcap' in the operands' dtype (``_chunk_grad_kernel``),
    then d_hidden += dl @ W_c (fp32 accumulator) and d_weight[chunk] = dl^T @ h, complete in one
    GEMM per chunk: no atomics, no (V, H) fp32 buffer. tcoef (N,): g * (p_y - 1), the target
    column before the softcap factor."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    dh = torch.zeros(N, H, device=device, dtype=torch.float32) if need_h else None
    dw = torch.empty(V, H, device=device, dtype=dtypes[1]) if need_w else None
    if N == 0 or not (need_h or need_w):
        if dw is not None:
            dw.zero_()
        return dh, dw
    C = gemm_chunk_cols(N, V)
    dl = torch.empty(N, C, device=device, dtype=hidden.dtype)
    br, bc, warps = _elementwise_config("grad", device, N)
    for v0 in range(0, V, C):
        wc = weight[v0:v0 + C]  # (c, H)
        z = _mm(hidden, wc.T, torch.float32)  # (N, c) fp32
        c = z.shape[1]
        dlc = dl[:, :c]
        _chunk_grad_kernel[(triton.cdiv(N, br), triton.cdiv(c, bc))](
            z, z.stride(0), dlc, dlc.stride(0), targets, lse, g, tcoef, N, c, v0,
            float(softcap or 0.0), HAS_SOFTCAP=softcap is not None, BLOCK_R=br, BLOCK_C=bc,
            num_warps=warps)
        del z
        if need_h:
            dh = _addmm_f32(dh, dlc, wc)
        if need_w:
            _mm(dlc.T, hidden, dtypes[1], out=dw[v0:v0 + c])
    return dh, dw


# ---------------------------------------------------------------------------------------------
# autograd: one Function for the "triton" and "gemm" implementations


def _compaction(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(N,) int64 row order with the scored rows first (stable): ignored rows (the prompt tokens
    of a packed batch) then fill whole row blocks at the end, which the kernels skip at once.
    Computed on the device, without a host sync."""
    return torch.argsort((targets == ignore_index).to(torch.int32), stable=True)


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, ignore_index, softcap, reduction,
                impl, num_splits, filter_eps, dtype):
        ctx.dtypes = _grad_dtypes(hidden, weight, token_weights)
        with no_autocast(hidden.device.type):
            y = targets.long().contiguous()
            order = None
            if impl == "triton":
                order = _compaction(y, ignore_index)
                Hp = padded_size(hidden.shape[1], hidden.device)
                h = padded(hidden.index_select(0, order), dtype, Hp)  # (N, Hp), scored rows first
                w = padded(weight, dtype, Hp)  # (V, Hp)
                yk = y.index_select(0, order)
                ce, lse, zt = _launch_fwd(h, w, yk, softcap, ignore_index, num_splits)
                ce_out = torch.empty_like(ce).index_copy_(0, order, ce)
            else:  # "gemm": any H, no copy of operands already in the compute dtype
                h, w, yk = hidden.to(dtype).contiguous(), weight.to(dtype).contiguous(), y
                ce, lse, zt = _gemm_fwd(h, w, y, softcap, ignore_index)
                ce_out = ce
            valid = y != ignore_index
            tw = valid.float() if token_weights is None else token_weights.float() * valid
            out = ce_out * tw  # (N,) fp32
        ctx.save_for_backward(h, w, yk, order, tw, ce_out, ce, lse, zt)
        ctx.softcap, ctx.ignore_index, ctx.H = softcap, ignore_index, hidden.shape[1]
        ctx.impl, ctx.filter_eps = impl, filter_eps
        return out.sum() if reduction == "sum" else out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, y, order, tw, ce_out, ce, lse, zt = ctx.saved_tensors
        need_h, need_w, need_tw = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        with no_autocast(h.device.type):
            grad_out = grad_out.float()
            g = tw * grad_out  # (N,)
            if order is not None:
                g = g.index_select(0, order)
            dh, dw = ce_backward(h, w, y, ctx.ignore_index, g.contiguous(), ce, lse, zt,
                                 ctx.softcap, need_h, need_w, dtypes=ctx.dtypes[:2], H=ctx.H,
                                 impl=ctx.impl, filter_eps=ctx.filter_eps)
            if dh is not None and order is not None:
                dh = torch.empty_like(dh).index_copy_(0, order, dh)
            d_tw = (ce_out * grad_out).to(ctx.dtypes[2]) if need_tw else None
        return dh, dw, None, d_tw, None, None, None, None, None, None, None


def ce_backward(hidden, weight, targets, ignore_index, g, ce, lse, zt, softcap, need_h, need_w,
                dtypes=None, H=None, impl="triton", filter_eps=0.0):
    """Gradients of sum_t g_t * CE_t with respect to hidden (N, Hp) and weight (V, Hp) (as the
    forward launched them), from the forward's per-row CE, lse and target logit (all (N,) fp32).
    impl "triton": the off-target part in the fused kernel (gradient filter ``filter_eps``, 0 =
    exact), the target column in fp32 here; "gemm": ``_gemm_bwd``. Returns (d_hidden | None,
    d_weight | None), cut back to the first ``H`` columns (default: all) and in ``dtypes``
    (default: the inputs' own)."""
    dtypes = dtypes or (hidden.dtype, weight.dtype)
    H = H or hidden.shape[1]
    # the target column in fp32: g * (p_y - 1) * softcap'(z_y), with p_y - 1 = expm1(-CE)
    # accurate however close p_y is to 1 (CE itself came from log1p); NaN on a bad target's row
    coef = (g * torch.expm1(-ce)).contiguous()
    if impl == "gemm":  # its elementwise kernel applies softcap' itself
        dh, dw = _gemm_bwd(hidden, weight, targets, g, coef, lse, softcap, need_h, need_w, dtypes)
        if dh is not None:
            dh = dh[:, :H].to(dtypes[0]).contiguous()
        if dw is not None:
            dw = dw[:, :H].contiguous()
        return dh, dw
    N, Hp = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    # the filter's per-row threshold: filter_eps x the row's off-target mass 1 - p_y = -expm1(-CE)
    thresholds = (-filter_eps * torch.expm1(-ce)).contiguous() if filter_eps > 0 else None
    if softcap is not None:
        coef = coef * (1.0 - (zt / softcap) ** 2)
    _, _, y = _target_rows(targets, ignore_index, V)
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
        _launch_bwd(hidden, weight[v0:v1], targets - v0 if v0 else targets, lse, g, softcap, dh,
                    buf, thresholds)
        if buf is not None:
            buf.index_add_(0, torch.where((y >= v0) & (y < v1), y - v0, slab), hc)
            dw[v0:v1] = buf[:v1 - v0, :H]
    if need_h:
        dh += coef[:, None] * weight.index_select(0, y).float()
        dh = dh[:, :H].to(dtypes[0]).contiguous()
    return dh, dw


def _fused(impl, hidden, weight, targets, token_weights, ignore_index, softcap, reduction,
           num_splits=None, filter_eps=None):
    if not HAS_TRITON:
        raise RuntimeError(f"the {impl} backend needs the triton package")
    _check(hidden, weight, targets, token_weights, reduction, ignore_index)
    if hidden.device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"the {impl} backend runs on CUDA tensors (or on CPU under "
                           "TRITON_INTERPRET=1 for testing); use backend='torch' on a CPU")
    dtype = compute_dtype(hidden, weight)
    dot_precision(dtype)  # a clear error for float64
    eps = default_filter_eps(dtype, filter_eps) if impl == "triton" else 0.0
    return _FusedLinearCE.apply(hidden, weight, targets, token_weights, ignore_index, softcap,
                                reduction, impl, num_splits, eps, dtype)


def linear_ce_triton(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                     softcap=None, reduction="sum", num_splits=None, filter_eps=None):
    """The fused Triton kernels (see the module docstring). CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1. ``num_splits`` forces the forward's vocabulary split count (tests);
    ``filter_eps`` the backward's gradient filter (default ``default_filter_eps``; 0 = exact)."""
    return _fused("triton", hidden, weight, targets, token_weights, ignore_index, softcap,
                  reduction, num_splits, filter_eps)


def linear_ce_gemm(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                   softcap=None, reduction="sum"):
    """Vocabulary chunks through cuBLAS GEMMs and fused Triton elementwise kernels (see the
    module docstring). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    return _fused("gemm", hidden, weight, targets, token_weights, ignore_index, softcap,
                  reduction)


# ---------------------------------------------------------------------------------------------
# reference: full logits


def linear_ce_reference(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                        softcap=None, reduction="sum"):
    """Full-logits oracle in fp32 (fp64 for fp64 inputs) whatever the compute dtype;
    differentiable through plain torch ops."""
    _check(hidden, weight, targets, token_weights, reduction, ignore_index)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    with no_autocast(hidden.device.type):
        logits = _softcap(hidden.to(acc) @ weight.to(acc).T, softcap)  # (N, V)
        scored, in_range, safe = _target_rows(targets, ignore_index, weight.shape[0])
        ce = logits.logsumexp(-1) - logits.gather(1, safe[:, None])[:, 0]  # (N,)
        # a bad target (only with the id check off) poisons the row's loss and gradients
        ce = torch.where(scored, ce, 0.0) * torch.where(scored & ~in_range, float("nan"), 1.0)
        w = scored.to(acc) if token_weights is None else token_weights.to(acc) * scored
        ce = ce * w
    return ce.sum() if reduction == "sum" else ce


# ---------------------------------------------------------------------------------------------
# torch twin: chunked over rows, custom autograd


def _rows_per_chunk(V: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, CHUNK_ELEMENTS // max(V, 1))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 accumulation, fp64 for fp64 inputs (so the twin can serve as an fp64 check too)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(h, weight, softcap):
    # h: (C, H), weight (V, H), both of the compute dtype -> z: (C, V) in the accumulation dtype
    return _softcap(torch.matmul(h, weight.T).to(_acc_dtype(weight.dtype)), softcap)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, ignore_index, softcap, reduction,
                chunk_rows, dtype):
        ctx.dtypes = _grad_dtypes(hidden, weight, token_weights)
        with no_autocast(hidden.device.type):
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            acc = _acc_dtype(dtype)
            N, V = hidden.shape[0], weight.shape[0]
            scored, in_range, _ = _target_rows(targets, ignore_index, V)
            rows = in_range.nonzero()[:, 0]  # (n,) the scored rows; ignored rows do no work
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
            ce = torch.where(scored & ~in_range, float("nan"), ce)  # (only with the check off)
            out = ce * w
        ctx.save_for_backward(hidden, weight, targets, w, rows, lse, ce)
        ctx.softcap, ctx.reduction, ctx.step = softcap, reduction, step
        return out.sum() if reduction == "sum" else out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, w, rows, lse, ce = ctx.saved_tensors
        softcap = ctx.softcap
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
                z = _chunk_logits(h, weight, softcap)  # (C, V)
                dz = torch.exp(z - lse[s:s + step, None])  # softmax, (C, V)
                dz.scatter_add_(1, targets[r].long()[:, None],
                                torch.full_like(lse[s:s + step, None], -1.0))
                dz *= g[r, None]
                if softcap is not None:
                    dz *= 1.0 - (z / softcap) ** 2
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
    _check(hidden, weight, targets, token_weights, reduction, ignore_index)
    return _ChunkedLinearCE.apply(hidden, weight, targets, token_weights, ignore_index, softcap,
                                  reduction, chunk_rows, compute_dtype(hidden, weight))


# ---------------------------------------------------------------------------------------------
# cost model (what "auto" decides by; ``python -m polyfast.bench.roofline`` prints it)

# A GPU as the model sees it: dense tensor-core rates (TFLOP/s) per operand width, HBM bandwidth
# (TB/s; fp32 atomics are counted at this rate too, an optimistic bound: they resolve in L2).
H100 = {"name": "H100 SXM", "tflops": {2: 989.0, 4: 67.0, "tf32": 494.5}, "tbps": 3.35}


def predict(backend: str, N: int, H: int, V: int, operand_bytes: int = 2,
            pass_fraction: float = 1.0, spec: dict = H100, backward: bool = True) -> dict:
    """Roofline prediction of one forward + backward (all rows scored, both gradients, 16-bit
    gradients of 16-bit operands): FLOPs, HBM bytes, fp32 atomic bytes, peak bytes of the op's
    own buffers (outputs and gradients included, inputs not) and time, each phase costing
    max(FLOPs / peak, bytes / bandwidth), the phases and the atomics added up.

    "gemm": 8NHV FLOPs in four GEMMs per chunk (forward logits, backward logits, d_hidden, d_weight)
    plus two elementwise passes over the fp32 logits (read 4 bytes a logit in the forward; read 4 and
    write ``operand_bytes`` in the backward).
    "triton": 4NHV FLOPs for the two logit sweeps, plus ``pass_fraction`` (the share of tiles that
    pass the gradient filter: data-dependent, 1 = none filtered) of the 4NHV gradient products and
    of the atomics: each tile adds (BLOCK_N + BLOCK_V) x H fp32 values, 4NHV (1/BLOCK_V +
    1/BLOCK_N) bytes in all. Operands are read from HBM once per pass (the launch order keeps the
    tiles that concurrent programs share in L2). ``backward=False``: the forward phases only (a
    frozen model's log-probs)."""
    b = operand_bytes
    peak = spec["tflops"][b] * 1e12
    bw = spec["tbps"] * 1e12
    nhv, nv = N * H * V, N * V
    grads = (N + V) * H * b  # d_hidden and d_weight as returned
    if backend == "gemm":
        C = gemm_chunk_cols(N, V)
        K = -(-V // C)
        gemm = 2 * nhv
        logits = K * N * H * b + V * H * b + nv * 4  # h per chunk, W once, fp32 logits out
        phases = [("forward logits GEMM", gemm, logits),
                  ("forward statistics", 0, nv * 4),
                  ("backward logits GEMM", gemm, logits),
                  ("softmax gradient", 0, nv * (4 + b)),
                  ("d_hidden GEMM", gemm, nv * b + V * H * b + 2 * K * N * H * 4),
                  ("d_weight GEMM", gemm, nv * b + K * N * H * b + V * H * b)]
        atomics = 0
        memory = N * C * (4 + b) + 2 * N * H * 4 + grads + 4 * N * 4
        if not backward:
            phases, memory = phases[:2], N * C * 4 + 4 * N * 4
    elif backend == "triton":
        bn, bv = _CONFIGS["hopper"]["bwd16" if b == 2 else "bwd32"][:2]
        f = pass_fraction
        sweep = (N + V) * H * b
        phases = [("forward sweep", 2 * nhv, sweep),
                  ("backward sweep", 2 * nhv, sweep),
                  ("gradient products", f * 4 * nhv, f * sweep)]
        atomics = f * 4 * nhv * (1 / bv + 1 / bn)
        # the compacted copy of h, fp32 d_hidden and target-column rows, the d_weight slab, the
        # gradients as returned
        memory = N * H * b + 2 * N * H * 4 + bwd_slab_rows(V, H) * H * 4 + grads
        if not backward:
            phases, atomics, memory = phases[:1], 0.0, N * H * b + 4 * N * 4
    else:
        raise ValueError(f"no cost model for backend {backend!r}")
    ms = sum(max(fl / peak, by / bw) for _, fl, by in phases) * 1e3 + atomics / bw * 1e3
    return {"backend": backend, "N": N, "H": H, "V": V, "flops": sum(p[1] for p in phases),
            "hbm_bytes": sum(p[2] for p in phases), "atomic_bytes": atomics, "memory_bytes": memory,
            "ms": ms, "phases": phases}


def choose_fused(N: int, H: int, V: int, operand_bytes: int = 2, spec: dict = H100,
                 backward: bool = True) -> str:
    """The fused backend with the lower predicted time at this shape (forward + backward, or the
    forward alone), the "triton" one taken as unfiltered (its filter rate is not known before the
    backward)."""
    times = {k: predict(k, max(N, 1), H, V, operand_bytes, spec=spec, backward=backward)["ms"]
             for k in ("gemm", "triton")}
    return min(times, key=times.get)


def auto_backend(hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """The backend "auto" runs: "torch" off CUDA, ``choose_fused`` on CUDA (forward only when
    neither input will get a gradient)."""
    if not (hidden.is_cuda and HAS_TRITON):
        return "torch"
    b = 2 if compute_dtype(hidden, weight) in SIXTEEN_BIT else 4
    backward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return choose_fused(hidden.shape[0], hidden.shape[1], weight.shape[0], b, backward=backward)


# ---------------------------------------------------------------------------------------------
# public entry point


def linear_cross_entropy(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                         softcap=None, reduction="sum", backend="auto", filter_eps=None):
    """``sum_t w_t * CE_t`` of the head projection ``hidden @ weight.T`` without (N, V) logits.

    hidden (N, H), weight (V, H), targets (N,), token_weights (N,) float or None (= 1).
    reduction "sum" gives a scalar, "none" the per-token ``w_t * CE_t`` (N,) (0 on ignored rows).
    backend: "auto" | "triton" | "gemm" | "torch" | "reference" (see the module docstring).
    The matmuls run in ``compute_dtype(hidden, weight)`` (the autocast dtype under autocast);
    gradients reach hidden, weight and token_weights, each in its own dtype. ``filter_eps``: the
    "triton" backward's gradient filter (default 2^-12 for 16-bit operands, 0 = exact).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = auto_backend(hidden, weight)
    if backend == "triton":
        return linear_ce_triton(hidden, weight, targets, token_weights, ignore_index=ignore_index,
                                softcap=softcap, reduction=reduction, filter_eps=filter_eps)
    if backend == "gemm":
        return linear_ce_gemm(hidden, weight, targets, token_weights, ignore_index=ignore_index,
                              softcap=softcap, reduction=reduction)
    if backend == "reference":
        return linear_ce_reference(hidden, weight, targets, token_weights, ignore_index=ignore_index,
                                   softcap=softcap, reduction=reduction)
    return linear_ce_torch(hidden, weight, targets, token_weights, ignore_index=ignore_index,
                           softcap=softcap, reduction=reduction)
