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
- "triton": the fused kernels below (CUDA; on a CPU only under TRITON_INTERPRET=1, for tests);
- "torch": the chunked twin: rows are processed in chunks whose logits fit a fixed budget; the
  forward keeps only the per-row log-sum-exp, the backward recomputes each chunk's logits. Peak extra
  memory is O(chunk * V) instead of O(N * V). Ignored rows are dropped before any matmul. The CPU
  production path;
- "reference": full logits in fp32 (fp64 for fp64 inputs) whatever the compute dtype, autograd
  through torch ops: the oracle of tests and benchmarks;
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
  recompute. Row blocks with no gradient (ignored or zero-weight rows) return at once; rows without
  gradient inside a block contribute exact zeros (their logits are never exponentiated against a
  log-sum-exp they do not have); frozen inputs (no requires_grad) get no atomics at all.
  The target column is left out of the tile and applied outside the kernel in fp32, with
  p_y - 1 = expm1(-CE) (a gather of W[y] and an index_add into d_weight), so a peaked
  distribution (p(target) = 0.999) keeps its gradient (p - 1 = -1e-3) with bf16 inputs: only the
  small off-target probabilities pass through 16-bit in tl.dot, where p_y would cancel against 1.

Bad ids: a target outside [0, V) that is not ignore_index is an error. On CPU tensors (and
everywhere with POLYFAST_CHECK_IDS=1) it raises a ValueError naming the row; on CUDA the check
would cost a host sync per call, so by default the kernels instead poison the row's loss and
gradients with NaN on the device (never a finite wrong value, never an out-of-bounds access).
POLYFAST_CHECK_IDS=0 turns the host check off everywhere.

Block sizes: a pinned config per GPU family, kernel and operand width (``_CONFIGS``), each one
checked for register spills, shared memory and tensor-core instructions by ``python -m
bench.compile_check`` (sm_90, sm_80 and sm_86, no GPU needed); POLYFAST_AUTOTUNE=1 times a few
candidates on first use of each shape instead and keeps the fastest. H reaches the kernels padded
to a multiple of the largest H block (``padded``; real models' hidden sizes already are), so the
kernels need no H masks and every row load is 16-byte aligned.

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
BACKENDS = ("auto", "triton", "torch", "reference")
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
            a = tl.load(h_ptr + rows[:, None] * stride_h + hk[None, :], mask=row_ok[:, None],
                        other=0.0)
            b = tl.load(w_ptr + cols[:, None] * stride_w + hk[None, :], mask=col_ok[:, None],
                        other=0.0)
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
    def _bwd_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, N, V, H, stride_h,
                    stride_w, softcap, HAS_SOFTCAP: tl.constexpr, COMPUTE_DH: tl.constexpr,
                    COMPUTE_DW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
        # off-target part of the gradient: d_hidden (N, H) += dl @ W, d_weight (V, H) += dl^T @ h,
        # dl = g * softmax(z) * softcap'(z) with the target column left out (done in fp32 outside);
        # both fp32 buffers, by atomics
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
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
            dl = tl.where(keep, tl.exp(z - lse[:, None]), 0.0) * g[:, None]
            if HAS_SOFTCAP:
                zc = z / softcap
                dl = dl * (1.0 - zc * zc)
            dl = dl.to(h_ptr.dtype.element_ty)
            for h0 in range(0, H, BLOCK_H):
                hk = h0 + tl.arange(0, BLOCK_H)
                if COMPUTE_DH:
                    b = tl.load(w_ptr + cols[:, None] * stride_w + hk[None, :],
                                mask=col_ok[:, None], other=0.0)
                    dh = tl.dot(dl, b, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_H)
                    tl.atomic_add(dh_ptr + rows[:, None] * H + hk[None, :], dh,
                                  mask=row_ok[:, None], sem="relaxed")
                if COMPUTE_DW:
                    a = tl.load(h_ptr + rows[:, None] * stride_h + hk[None, :],
                                mask=row_ok[:, None], other=0.0)
                    dw = tl.dot(tl.trans(dl), a, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_H)
                    tl.atomic_add(dw_ptr + cols[:, None] * H + hk[None, :], dw,
                                  mask=col_ok[:, None], sem="relaxed")


# ---------------------------------------------------------------------------------------------
# launchers

# Pinned configs: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) per GPU family, kernel
# ("fwd" / "bwd" here, "joint": joint_logprobs' forward) and operand width ("16": bf16 / fp16 on
# tensor cores; "32": fp32). Chosen with `python -m bench.compile_check` for no register spills
# and shared memory within the architecture's limit (the fp32 ones are smaller: true fp32
# products unroll into FMA chains that spill at the 16-bit tile sizes).
_CONFIGS = {
    "hopper": {"fwd16": (128, 128, 32, 8, 4), "bwd16": (128, 128, 64, 8, 3),
               "joint16": (128, 64, 64, 8, 3),
               "fwd32": (64, 128, 32, 8, 2), "bwd32": (64, 64, 32, 8, 2),
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


def _launch_fwd(hidden, weight, targets, softcap, ignore_index, num_splits=None):
    """Per-row (CE, lse, target logit), each (N,) fp32, 0 on ignored rows and NaN on rows whose
    target is out of range. hidden (N, H) and weight (V, H) as ``padded`` makes them, of the
    compute dtype; targets (N,) int64, contiguous."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    if N == 0:
        empty = torch.zeros(0, device=device, dtype=torch.float32)
        return empty, empty.clone(), empty.clone()

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
    m, s, zt = run(cfg)
    # merge the splits: M = max_s m_s, S = sum_s s_s exp(m_s - M) (off-target mass), and
    # CE = lse - z_y = log(1 + S exp(M - z_y)) = log1p(r): no cancellation when p_y -> 1
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


def _launch_bwd(hidden, weight, targets, lse, g, softcap, need_h, need_w):
    """Off-target part of the gradients into fp32 buffers; None for an input that needs no grad."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    dh = torch.zeros(N, H, device=device, dtype=torch.float32) if need_h else None
    dw = torch.zeros(V, H, device=device, dtype=torch.float32) if need_w else None
    if not (need_h or need_w) or N == 0:
        return dh, dw

    def run(cfg):
        bn, bv, bh, warps, stages = cfg
        dummy = lse  # a pointer the kernel never touches when a gradient is not computed
        _bwd_kernel[(triton.cdiv(N, bn), triton.cdiv(V, bv))](
            hidden, weight, targets, lse, g, dh if need_h else dummy, dw if need_w else dummy, N, V, H,
            hidden.stride(0), weight.stride(0), float(softcap or 0.0),
            HAS_SOFTCAP=softcap is not None, COMPUTE_DH=need_h, COMPUTE_DW=need_w, BLOCK_N=bn,
            BLOCK_V=bv, BLOCK_H=bh, DOT_PRECISION=dot_precision(hidden.dtype), num_warps=warps,
            num_stages=stages)

    cfg = _config("bwd", device, hidden.dtype, (N // 1024, H, V, need_h, need_w), run)
    if dh is not None:
        dh.zero_()  # the tuner's trial runs (if any) accumulated into the buffers
    if dw is not None:
        dw.zero_()
    run(cfg)
    return dh, dw


class _TritonLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, ignore_index, softcap, reduction,
                num_splits, dtype):
        ctx.dtypes = _grad_dtypes(hidden, weight, token_weights)
        with no_autocast(hidden.device.type):
            Hp = padded_size(hidden.shape[1], hidden.device)
            h, w = padded(hidden, dtype, Hp), padded(weight, dtype, Hp)  # (N, Hp), (V, Hp)
            y = targets.long().contiguous()
            ce, lse, zt = _launch_fwd(h, w, y, softcap, ignore_index, num_splits)
            valid = y != ignore_index
            tw = valid.float() if token_weights is None else token_weights.float() * valid
            out = ce * tw  # (N,) fp32
        ctx.save_for_backward(h, w, y, tw, ce, lse, zt)
        ctx.softcap, ctx.ignore_index, ctx.H = softcap, ignore_index, hidden.shape[1]
        return out.sum() if reduction == "sum" else out

    @staticmethod
    def backward(ctx, grad_out):
        h, w, y, tw, ce, lse, zt = ctx.saved_tensors
        need_h, need_w, need_tw = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        with no_autocast(h.device.type):
            grad_out = grad_out.float()
            g = (tw * grad_out).contiguous()  # (N,)
            dh, dw = ce_backward(h, w, y, ctx.ignore_index, g, ce, lse, zt, ctx.softcap, need_h,
                                 need_w, dtypes=ctx.dtypes[:2], H=ctx.H)
            d_tw = (ce * grad_out).to(ctx.dtypes[2]) if need_tw else None
        return dh, dw, None, d_tw, None, None, None, None, None


def ce_backward(hidden, weight, targets, ignore_index, g, ce, lse, zt, softcap, need_h, need_w,
                dtypes=None, H=None):
    """Gradients of sum_t g_t * CE_t with respect to hidden (N, Hp) and weight (V, Hp) (both as
    the forward launched them: ``padded``), from the forward's per-row CE, lse and target logit
    (all (N,) fp32): the off-target part in the Triton kernel, the target column in fp32 here.
    Returns (d_hidden | None, d_weight | None), cut back to the first ``H`` columns (default: all)
    and in ``dtypes`` (default: the inputs' own)."""
    dh_dtype, dw_dtype = dtypes or (hidden.dtype, weight.dtype)
    H = H or hidden.shape[1]
    dh, dw = _launch_bwd(hidden, weight, targets, lse, g, softcap, need_h, need_w)
    # the target column in fp32: g * (p_y - 1) * softcap'(z_y), with p_y - 1 = expm1(-CE)
    # accurate however close p_y is to 1 (CE itself came from log1p); NaN on a bad target's row
    coef = g * torch.expm1(-ce)
    if softcap is not None:
        coef = coef * (1.0 - (zt / softcap) ** 2)
    _, _, y = _target_rows(targets, ignore_index, weight.shape[0])
    if need_h:
        dh += coef[:, None] * weight.index_select(0, y).float()
        dh = dh[:, :H].to(dh_dtype).contiguous()
    if need_w:
        dw.index_add_(0, y, hidden.float() * coef[:, None])
        dw = dw[:, :H].to(dw_dtype).contiguous()
    return dh, dw


def linear_ce_triton(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                     softcap=None, reduction="sum", num_splits=None):
    """The fused Triton kernels (see the module docstring). CUDA tensors, or CPU tensors under
    TRITON_INTERPRET=1. ``num_splits`` forces the forward's vocabulary split count (tests)."""
    if not HAS_TRITON:
        raise RuntimeError("the triton backend needs the triton package")
    _check(hidden, weight, targets, token_weights, reduction, ignore_index)
    if hidden.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the triton backend runs on CUDA tensors (or on CPU under "
                           "TRITON_INTERPRET=1 for testing); use backend='torch' on a CPU")
    dtype = compute_dtype(hidden, weight)
    dot_precision(dtype)  # a clear error for float64
    return _TritonLinearCE.apply(hidden, weight, targets, token_weights, ignore_index, softcap,
                                 reduction, num_splits, dtype)


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
# public entry point


def linear_cross_entropy(hidden, weight, targets, token_weights=None, *, ignore_index=-100,
                         softcap=None, reduction="sum", backend="auto"):
    """``sum_t w_t * CE_t`` of the head projection ``hidden @ weight.T`` without (N, V) logits.

    hidden (N, H), weight (V, H), targets (N,), token_weights (N,) float or None (= 1).
    reduction "sum" gives a scalar, "none" the per-token ``w_t * CE_t`` (N,) (0 on ignored rows).
    backend: "auto" | "triton" | "torch" | "reference" (see the module docstring). The matmuls
    run in ``compute_dtype(hidden, weight)`` (the autocast dtype under autocast); gradients reach
    hidden, weight and token_weights, each in its own dtype.
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
