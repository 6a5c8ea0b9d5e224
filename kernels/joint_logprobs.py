"""Joint sequence log-probabilities of several models (policy, reference, critic) per segment.

For M models with hidden states h_m (N, H_m) and head weights W_m (V, H_m), targets y (N,) and
segment ids s (N,) (-1 = not scored):

    logp_m[t]  = softcap_m(h_m[t] @ W_m^T)[y_t] - logsumexp(softcap_m(h_m[t] @ W_m^T))
    sums[m, k] = sum_{t: s_t = k} logp_m[t],      counts[k] = #{t: s_t = k}

HDPO needs exactly these (M, S) sums: chosen/rejected log-probs of the policy, of the frozen
reference and of an LM critic, for every pair in a pack. Gradients flow only to the models whose
hidden states or weights require grad (the policy); frozen models run without autograd.

Backends, chosen per call:
- "separate": per model, one ``linear_cross_entropy`` call with reduction "none" and backend
  "auto" (on CUDA its cost model picks the fused kernel: the "gemm" backend for the policy's
  forward + backward, the fused Triton forward for a frozen model), then a segment scatter-add;
  frozen models under no_grad.
- "triton": one launch over (row block, model, vocabulary split): each program sweeps its share
  of the vocabulary in (BLOCK_V, H_m) tiles of its model's head (tl.dot in SRAM, fp32 accumulate)
  and keeps an online max, the off-target sum-exp and the target logit; the splits are merged by
  a few (M, P, N) torch ops into each token's log-prob (-log1p(S_off exp(max - z_y)), exact when
  p(target) -> 1) and scatter-added into the (M, S) sums. Up to three models (policy, reference,
  critic) with their own hidden sizes and softcaps share the launch, in one compute dtype
  (``checks.compute_dtype`` of all their operands: bf16 under autocast). The splits give the
  launch about four programs per SM at HDPO's pack sizes (N = 2048-8192: 16-64 row blocks per
  model alone cannot fill 132 SMs). What it saves over separate calls is launches and merges:
  2M kernel launches and M sets of merge ops become one launch and one merge; the FLOPs and the
  head reads are the same. Measured on an H100 (bench/RESULTS.md) it is slower than the separate
  calls (whose policy call runs the "gemm" backend), so "auto" does not pick it. Backward only for
  the models that need it: from d(sums) (M, S) each token's weight is -d(sums)[m, seg_t], and
  linear_ce's fused backward does the rest (``backward``: "gemm" (gemm.py), or the fused
  Triton kernel with its gradient filter (fused_bwd.py); "auto": what the cost model says);
  frozen models keep nothing for backward.
- "torch": per model, the chunked linear cross-entropy twin (no (N, V) logits) with reduction
  "none", then a segment scatter-add; frozen models under no_grad. The CPU production path.
- "reference": full log-softmax per model in fp32 (fp64 for fp64 inputs), then the scatter-add: the
  oracle of tests and benchmarks.
- "auto": "separate" for CUDA tensors, "torch" otherwise.

Bad ids (a scored token's target outside [0, V), a segment id >= num_segments) raise a
ValueError on CPU tensors and with POLYFAST_CHECK_IDS=1; on CUDA by default they poison the sums
and the rows' log-probs with NaN on the device (see linear_ce), never writing out of bounds.

Shapes: hiddens[m] (N, H_m), weights[m] (V, H_m), targets (N,), segment_ids (N,) int.
Returns logp_sums (M, S) fp32 (fp64 under the fp64 reference), token_counts (S,) int64 and, with
``return_token_logprobs``, the per-token log-probs (M, N) (0 where not scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checks import (IGNORE_INDEX, check_ids, compute_dtype, dot_precision, no_autocast,
                     require_fused, target_rows)
from .configs import num_sms, padded, pinned_config
from .fused_bwd import default_filter_eps
from .linear_ce import FUSED, auto_backend, linear_cross_entropy, padded_operands
from .torch_twin import linear_ce_reference, linear_ce_torch
from .triton_helpers import HAS_TRITON, merge_stats, row_stats, row_stats_shared

if HAS_TRITON:
    import triton
    import triton.language as tl

BACKENDS = ("auto", "separate", "triton", "torch", "reference")
MAX_TRITON_MODELS = 3


def _check(hiddens, weights, targets, segment_ids, num_segments, softcaps, requires_grad):
    M = len(hiddens)
    if M == 0 or len(weights) != M:
        raise ValueError(f"need one weight per hidden, got {M} hiddens and {len(weights)} weights")
    N = targets.shape[0]
    V = weights[0].shape[0]
    for m, (h, w) in enumerate(zip(hiddens, weights)):
        if h.dim() != 2 or w.dim() != 2 or h.shape[0] != N or h.shape[1] != w.shape[1] \
                or w.shape[0] != V:
            raise ValueError(f"model {m}: hidden {tuple(h.shape)} / weight {tuple(w.shape)} do not "
                             f"fit N={N}, V={V}")
    if targets.dim() != 1 or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be (N,) int32/int64, got {tuple(targets.shape)} {targets.dtype}")
    if segment_ids.shape != targets.shape:
        raise ValueError(f"segment_ids {tuple(segment_ids.shape)} != targets {tuple(targets.shape)}")
    if segment_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"segment_ids must be int32/int64, got {segment_ids.dtype}")
    if int(num_segments) != num_segments or num_segments < 0:
        raise ValueError(f"num_segments must be a non-negative int, got {num_segments!r}")
    for name, seq in (("softcaps", softcaps), ("requires_grad", requires_grad)):
        if seq is not None and len(seq) != M:
            raise ValueError(f"{name} needs one entry per model ({M}), got {len(seq)}")
    unscored = segment_ids < 0
    check_ids(segment_ids, num_segments, "segment_ids", skip=unscored)
    check_ids(targets, V, "targets (of scored tokens)", skip=unscored)


# ---------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:

    @triton.jit
    def joint_fwd_kernel(h0, w0, H0, sh0, sw0, cap0, h1, w1, H1, sh1, sw1, cap1,
                          h2, w2, H2, sh2, sw2, cap2, y_ptr, seg_ptr, m_ptr, s_ptr, zt_ptr,
                          N, V, S, v_per_split, NUM_MODELS: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, SHARED_HEAD: tl.constexpr = False):
        # grid (row blocks, models, vocabulary splits): each program's (max, off-target sum-exp,
        # target logit) over its split, into (M, P, N) buffers. cap_m = 0: model m has no softcap.
        # SHARED_HEAD (models 0 and 1 have one head, w0 == w1): grid (row blocks, M - 1, splits);
        # program 0 of the second axis sweeps the head once for models 0 and 1, program 1 does
        # model 2.
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(2)
        model = 2 * tl.program_id(1) if SHARED_HEAD else tl.program_id(1)
        num_splits = tl.num_programs(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        seg = tl.load(seg_ptr + rows, mask=row_ok, other=-1)
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        scored = row_ok & (seg >= 0) & (seg < S)  # (an id >= S is poisoned by the launcher)
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        m1, s1, zt1 = m, s, zt  # model 1's, when program 0 sweeps a shared head for both
        if tl.max(scored.to(tl.int32), axis=0) > 0:
            v0 = pid_s * v_per_split
            v1 = tl.minimum(v0 + v_per_split, V)
            if model == 0:
                if SHARED_HEAD:
                    m, s, zt, m1, s1, zt1 = row_stats_shared(
                        h0, h1, w0, y, rows, row_ok, v0, v1, H0, sh0, sh1, sw0, cap0, cap1,
                        HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
                else:
                    m, s, zt = row_stats(h0, w0, y, rows, row_ok, v0, v1, H0, sh0, sw0, cap0,
                                         HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
            if NUM_MODELS > 1 and not SHARED_HEAD:
                if model == 1:
                    m, s, zt = row_stats(h1, w1, y, rows, row_ok, v0, v1, H1, sh1, sw1,
                                         cap1, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H,
                                         DOT_PRECISION)
            if NUM_MODELS > 2:
                if model == 2:
                    m, s, zt = row_stats(h2, w2, y, rows, row_ok, v0, v1, H2, sh2, sw2,
                                         cap2, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H,
                                         DOT_PRECISION)
        out = (model * num_splits + pid_s) * N + rows
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(s_ptr + out, s, mask=row_ok)
        tl.store(zt_ptr + out, zt, mask=row_ok)
        if SHARED_HEAD:
            if model == 0:
                out = (num_splits + pid_s) * N + rows
                tl.store(m_ptr + out, m1, mask=row_ok)
                tl.store(s_ptr + out, s1, mask=row_ok)
                tl.store(zt_ptr + out, zt1, mask=row_ok)


# the argument types the launcher passes (sizes and strides: i32), for bench.compile_check
SIGNATURES = {"joint.fwd": {
    "types": {"y_ptr": "*i64", "seg_ptr": "*i64", "m_ptr": "*fp32", "s_ptr": "*fp32",
              "zt_ptr": "*fp32", "v_per_split": "i32",
              **{f"{k}{m}": t for m in range(3)
                 for k, t in (("h", "*operand"), ("w", "*operand"), ("cap", "fp32"))}},
    "constexprs": lambda v: {"NUM_MODELS": int(v.what.split("=")[1].split()[0]),
                             "SHARED_HEAD": v.what.endswith("shared")}}}


def joint_splits(N: int, V: int, block_n: int, block_v: int, num_sms: int, M: int = 1) -> int:
    """Vocabulary splits of the joint forward: enough (row block, model, split) programs to give
    every SM about four, never more than the vocabulary has blocks."""
    n_blocks = -(-N // block_n)
    return max(1, min(-(-V // block_v), -(-4 * num_sms // (n_blocks * M))))


def _launch_joint_fwd(hiddens, weights, targets, segs, S, softcaps, num_splits=None,
                      shared_head=False):
    """(token log-probs, CE, lse), each (M, N) fp32, and the (M, S) fp32 sums. hiddens[m] (N, H_m)
    and weights[m] (V, H_m) as ``linear_ce.padded_operands`` makes them, all of one compute dtype;
    targets (N,) int64 (0 where not scored), segs (N,) int64. ``num_splits`` forces the
    vocabulary split count (tests); ``shared_head``: weights[1] is weights[0], swept once for
    both."""
    M, N, V = len(hiddens), targets.shape[0], weights[0].shape[0]
    device = targets.device
    sums = torch.zeros(M, S, device=device, dtype=torch.float32)
    if N == 0:
        lp = torch.zeros(M, 0, device=device, dtype=torch.float32)
        return lp, lp.clone(), lp.clone(), sums
    dtype = hiddens[0].dtype
    bn, bv, bh, warps, stages = pinned_config("jointshared" if shared_head else "joint", device,
                                              dtype)
    programs = M - 1 if shared_head else M  # (row block, split) programs per row block
    P = num_splits or joint_splits(N, V, bn, bv, num_sms(device), programs)
    v_per_split = triton.cdiv(triton.cdiv(V, P), bv) * bv
    P = triton.cdiv(V, v_per_split)
    args = []
    for m in range(MAX_TRITON_MODELS):
        k = min(m, M - 1)  # unused slots repeat the last model; the kernel never reads them
        h, w = hiddens[k], weights[k]
        args += [h, w, h.shape[1], h.stride(0), w.stride(0), float(softcaps[k] or 0.0)]
    part = torch.empty(3, M, P, N, device=device, dtype=torch.float32)  # (m, s, zt) per split
    joint_fwd_kernel[(triton.cdiv(N, bn), programs, P)](
        *args, targets, segs, part[0], part[1], part[2], N, V, S, v_per_split, NUM_MODELS=M,
        HAS_SOFTCAP=any(c is not None for c in softcaps), BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
        DOT_PRECISION=dot_precision(dtype), SHARED_HEAD=shared_head, num_warps=warps,
        num_stages=stages)
    scored = (segs >= 0) & (segs < S)
    y = torch.where(scored, targets, IGNORE_INDEX)
    ce = torch.empty(M, N, device=device, dtype=torch.float32)
    lse = torch.empty_like(ce)
    for m in range(M):
        ce[m], lse[m], _ = merge_stats(part[0, m], part[1, m], part[2, m], y, IGNORE_INDEX,
                                             V)
    lp = -ce
    sums.index_add_(1, torch.where(scored, segs, 0), torch.where(scored, lp, 0.0))
    return lp, ce, lse, sums


@dataclass(frozen=True)
class JointParams:
    """What a single-launch joint call computes, resolved once: per model its softcap and whether
    it trains, the compute dtype, and the launch's knobs."""

    num_segments: int
    softcaps: tuple                 # (M,) float | None
    trains: tuple                   # (M,) bool: the models that get a backward
    dtype: torch.dtype              # compute_dtype of every model's operands
    backward: str                   # the trainable models' backward: "triton" | "gemm"
    filter_eps: float               # "triton" backward's gradient filter (0 = exact)
    num_splits: int | None = None   # the forward's vocabulary splits (None: as the GPU needs)
    shared_head: bool = False       # models 0 and 1 read one head (LoRA's policy and reference)


class TritonJoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, targets, segs, p: JointParams, *tensors):
        # tensors: hidden_0, weight_0, hidden_1, weight_1, ...
        M, num_segments, softcaps, dtype = len(tensors) // 2, p.num_segments, p.softcaps, p.dtype
        ctx.orig = [(tensors[2 * m].dtype, tensors[2 * m + 1].dtype) for m in range(M)]
        with no_autocast(targets.device.type):
            hiddens, weights = [], []
            for m in range(M):  # (N, Hp_m), (V, Hp_m): H padded as the kernels need it
                if m == 1 and p.shared_head:  # model 0's head, padded once
                    h, w = padded(tensors[2], dtype, weights[0].shape[1]), weights[0]
                else:
                    h, w = padded_operands(tensors[2 * m], tensors[2 * m + 1], dtype)
                hiddens.append(h)
                weights.append(w)
            segs = segs.long().contiguous()
            scored = segs >= 0
            _, in_range, y = target_rows(torch.where(scored, targets, IGNORE_INDEX),
                                         IGNORE_INDEX, weights[0].shape[0])
            lp, ce, lse, sums = _launch_joint_fwd(hiddens, weights, y, segs, num_segments,
                                                  softcaps, p.num_splits, p.shared_head)
            # bad ids (possible only with the id check off) poison their rows and all the sums
            bad = (scored & ~in_range) | (segs >= num_segments)
            lp = torch.where(bad, float("nan"), lp)
            ce = torch.where(bad, float("nan"), ce)
            sums = sums + torch.where(bad.any(), float("nan"), 0.0)
        saved = [y, segs, ce, lse]
        ctx.trainable = [m for m in range(M) if p.trains[m]]
        ctx.sizes = [tensors[2 * m].shape[1] for m in range(M)]
        for m in ctx.trainable:  # frozen models keep nothing
            saved += [hiddens[m], weights[m]]
        ctx.save_for_backward(*saved)
        ctx.p, ctx.M = p, M
        return sums, lp

    @staticmethod
    def backward(ctx, d_sums, d_lp):
        y, segs, ce, lse, *rest = ctx.saved_tensors
        grads = [None] * (2 * ctx.M)
        p = ctx.p
        scored = (segs >= 0) & (segs < p.num_segments)
        seg = torch.where(scored, segs, 0)
        with no_autocast(y.device.type):
            for k, m in enumerate(ctx.trainable):
                h, w = rest[2 * k], rest[2 * k + 1]
                # logp = -CE: each token's CE weight is -(d sums[m, seg_t] + d lp[m, t])
                g = -(d_sums[m].float().gather(0, seg) + d_lp[m].float())
                g = torch.where(scored, g, 0.0).contiguous()
                need_h = ctx.needs_input_grad[3 + 2 * m]
                need_w = ctx.needs_input_grad[4 + 2 * m]
                zt = lse[m] - ce[m]
                y_m = torch.where(scored, y, IGNORE_INDEX)
                dh, dw = FUSED[p.backward].backward(
                    h, w, y_m, g, ce[m], lse[m], zt, softcap=p.softcaps[m],
                    ignore_index=IGNORE_INDEX, need_h=need_h, need_w=need_w, dtypes=ctx.orig[m],
                    H=ctx.sizes[m], filter_eps=p.filter_eps)
                grads[2 * m], grads[2 * m + 1] = dh, dw
        return (None, None, None, *grads)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of the same memory with the same layout (a detached copy of
    a head is still its head)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def joint_logprobs_triton(hiddens, weights, targets, segment_ids, num_segments, *, softcaps=None,
                          requires_grad=None, return_token_logprobs=False, num_splits=None,
                          backward="auto", filter_eps=None, shared_head=True):
    """The single-launch Triton forward (see the module docstring): CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1; up to three models. When models 0 and 1 have one head (the same
    tensor: LoRA's policy and its adapters-off reference), each tile of it is read once for both
    (``shared_head=False`` reads it twice, for comparison). ``num_splits`` forces the vocabulary
    split count; ``backward`` the trainable models' backward ("triton" | "gemm"; "auto": what
    linear_cross_entropy's "auto" would run on CUDA, "triton" under the interpreter);
    ``filter_eps`` the "triton" backward's gradient filter."""
    _check(hiddens, weights, targets, segment_ids, num_segments, softcaps, requires_grad)
    M = len(hiddens)
    if M > MAX_TRITON_MODELS:
        raise ValueError(f"the triton backend takes up to {MAX_TRITON_MODELS} models, got {M}")
    require_fused("triton", targets.device, HAS_TRITON)
    softcaps = list(softcaps) if softcaps is not None else [None] * M
    if requires_grad is None:
        requires_grad = [h.requires_grad or w.requires_grad for h, w in zip(hiddens, weights)]
    dtype = compute_dtype(*hiddens, *weights)
    dot_precision(dtype)  # a clear error for float64
    shared = M >= 2 and same_tensor(weights[0], weights[1])  # (_check: then the H's agree too)
    tensors = []
    for h, w, g in zip(hiddens, weights, requires_grad):
        tensors += [h, w] if g else [h.detach(), w.detach()]
    if backward not in ("auto", "triton", "gemm"):
        raise ValueError(f"backward must be 'auto', 'triton' or 'gemm', got {backward!r}")
    if backward == "auto":
        trainable = [m for m in range(M) if requires_grad[m]]
        backward = ("triton" if not trainable or not targets.is_cuda
                    else auto_backend(hiddens[trainable[0]], weights[trainable[0]]))
    params = JointParams(num_segments, tuple(softcaps), tuple(requires_grad), dtype, backward,
                         default_filter_eps(dtype, filter_eps), num_splits,
                         shared_head=shared and shared_head)
    sums, lp = TritonJoint.apply(targets, segment_ids, params, *tensors)
    counts = _segment_counts(segment_ids, num_segments)
    return (sums, counts, lp) if return_token_logprobs else (sums, counts)


def _segment_counts(segment_ids, num_segments):
    # (S,) int64: scored tokens per segment (ids >= num_segments counted nowhere)
    scored = (segment_ids >= 0) & (segment_ids < num_segments)
    counts = torch.zeros(num_segments, dtype=torch.int64, device=segment_ids.device)
    return counts.index_add_(0, torch.where(scored, segment_ids, 0).long(), scored.long())


def _token_logprobs(fn, h, w, targets, softcap):
    # -(CE) per token, 0 on ignored rows; (N,)
    return -fn(h, w, targets, softcap=softcap, reduction="none")


def joint_logprobs(hiddens: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], targets,
                   segment_ids, num_segments: int, *, softcaps=None, requires_grad=None,
                   backend: str = "auto", return_token_logprobs: bool = False):
    """Per-segment sums of per-token log-probs for M models; see the module docstring.

    ``requires_grad[m]`` (default: whether model m's hidden or weight requires grad) decides which
    models get a backward graph.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "separate" if targets.is_cuda and HAS_TRITON else "torch"
    if backend == "triton":
        return joint_logprobs_triton(hiddens, weights, targets, segment_ids, num_segments,
                                     softcaps=softcaps, requires_grad=requires_grad,
                                     return_token_logprobs=return_token_logprobs)
    _check(hiddens, weights, targets, segment_ids, num_segments, softcaps, requires_grad)
    M = len(hiddens)
    softcaps = list(softcaps) if softcaps is not None else [None] * M
    if requires_grad is None:
        requires_grad = [h.requires_grad or w.requires_grad for h, w in zip(hiddens, weights)]
    scored = (segment_ids >= 0) & (segment_ids < num_segments)
    t = torch.where(scored, targets, IGNORE_INDEX)
    seg = torch.where(scored, segment_ids, 0).long()
    fn = {"reference": linear_ce_reference, "torch": linear_ce_torch,
          "separate": linear_cross_entropy}[backend]
    per_token = []
    for h, w, cap, grad in zip(hiddens, weights, softcaps, requires_grad):
        if grad:
            per_token.append(_token_logprobs(fn, h, w, t, cap))
        else:
            with torch.no_grad():
                per_token.append(_token_logprobs(fn, h.detach(), w.detach(), t, cap))
    token_lp = torch.stack(per_token)  # (M, N)
    sums = token_lp.new_zeros(M, num_segments).index_add(1, seg, token_lp)  # (M, S)
    # a segment id >= num_segments (possible only with the id check off) poisons all the sums
    sums = sums + torch.where((segment_ids >= num_segments).any(), float("nan"), 0.0)
    counts = _segment_counts(segment_ids, num_segments)
    if return_token_logprobs:
        return sums, counts, token_lp
    return sums, counts


def joint_logprobs_reference(hiddens, weights, targets, segment_ids, num_segments, **kw):
    """The full-logits oracle (same as ``backend="reference"``)."""
    return joint_logprobs(hiddens, weights, targets, segment_ids, num_segments, backend="reference",
                          **kw)
