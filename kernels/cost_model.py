"""A roofline cost model of the fused loss-head backends: what "auto" decides by, and what
``python -m polyfast.bench.roofline`` prints.

Each phase of a backend costs max(FLOPs / peak, bytes / bandwidth); the phases and the fp32 atomics
(counted at HBM rate, an optimistic bound: they resolve in L2) add up. Per backend, at N rows,
hidden size H and vocabulary V:

- "gemm": 8NHV FLOPs (four GEMMs of 2NHV: forward logits, backward logits, d_hidden, d_weight)
  plus the elementwise passes over the fp32 logits: 4 bytes read per logit in the forward, 4 read
  and ``operand_bytes`` written in the backward, plus the GEMMs' own traffic (h once per chunk,
  the logits written, dl read twice). Memory: the fp32 logit chunk, dl, two fp32 d_hidden
  accumulators and the 16-bit gradients.
- "triton": 4NHV FLOPs for the two logit sweeps, plus, for the share f of tiles that pass the
  gradient filter (data-dependent; 1 = none filtered), 4NHV FLOPs of products and 4NHV (1/BLOCK_N
  + 1/BLOCK_V) bytes of fp32 atomics. Operands are read once per pass (the launch order keeps the
  tiles that concurrent programs share in L2). Memory: h, the fp32 d_hidden and target-column
  buffers, the d_weight slab and the gradients.

With ``backward=False`` only the forward phases count (a frozen model's log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configs import CONFIGS
from .fused_bwd import bwd_slab_rows
from .gemm import gemm_chunk_cols


@dataclass(frozen=True)
class DeviceSpec:
    """A GPU as the model sees it: dense tensor-core rates (TFLOP/s) per operand width in bytes
    (and "tf32"), HBM bandwidth (TB/s), and the config family whose block sizes it launches."""

    name: str
    tflops: dict
    tbps: float
    family: str = "hopper"


H100 = DeviceSpec("H100 SXM", {2: 989.0, 4: 67.0, "tf32": 494.5}, 3.35)
H200 = DeviceSpec("H200 SXM", {2: 989.0, 4: 67.0, "tf32": 494.5}, 4.8)
A100 = DeviceSpec("A100 SXM", {2: 312.0, 4: 19.5, "tf32": 156.0}, 2.039, "ampere")
DEVICES = {"H100": H100, "H200": H200, "A100": A100}
_SPECS: dict[int, DeviceSpec] = {}


def device_spec(device: torch.device | None = None) -> DeviceSpec:
    """The spec of a CUDA device, found by name (H100 for a GPU the table does not know, and
    without a GPU)."""
    if device is None or device.type != "cuda":
        return H100
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SPECS:  # looked up once per device
        name = torch.cuda.get_device_name(index)
        _SPECS[index] = next((spec for key, spec in DEVICES.items() if key in name), H100)
    return _SPECS[index]


def predict(backend: str, N: int, H: int, V: int, operand_bytes: int = 2,
            pass_fraction: float = 1.0, spec: DeviceSpec = H100, backward: bool = True) -> dict:
    """Roofline prediction of one forward + backward (all rows scored, both gradients, 16-bit
    gradients of 16-bit operands): FLOPs, HBM bytes, fp32 atomic bytes, peak bytes of the op's
    own buffers (outputs and gradients included, inputs not) and time (see the module docstring).
    ``pass_fraction``: the "triton" backward's share of tiles past the gradient filter."""
    b = operand_bytes
    peak = spec.tflops[b] * 1e12
    bw = spec.tbps * 1e12
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
        bn, bv = CONFIGS[spec.family]["bwd16" if b == 2 else "bwd32"][:2]
        f = pass_fraction
        sweep = (N + V) * H * b
        phases = [("forward sweep", 2 * nhv, sweep),
                  ("backward sweep", 2 * nhv, sweep),
                  ("gradient products", f * 4 * nhv, f * sweep)]
        atomics = f * 4 * nhv * (1 / bv + 1 / bn)
        # h, fp32 d_hidden and target-column rows, the d_weight slab, the gradients as returned
        memory = N * H * b + 2 * N * H * 4 + bwd_slab_rows(V, H) * H * 4 + grads
        if not backward:
            phases, atomics, memory = phases[:1], 0.0, N * H * b + 4 * N * 4
    else:
        raise ValueError(f"no cost model for backend {backend!r}")
    ms = sum(max(fl / peak, by / bw) for _, fl, by in phases) * 1e3 + atomics / bw * 1e3
    return {"backend": backend, "N": N, "H": H, "V": V, "flops": sum(p[1] for p in phases),
            "hbm_bytes": sum(p[2] for p in phases), "atomic_bytes": atomics, "memory_bytes": memory,
            "ms": ms, "phases": phases}


def choose_fused(N: int, H: int, V: int, operand_bytes: int = 2, spec: DeviceSpec = H100,
                 backward: bool = True) -> str:
    """The fused backend with the lower predicted time at this shape (forward + backward, or the
    forward alone), the "triton" one taken as unfiltered (its filter rate is not known before the
    backward)."""
    times = {k: predict(k, max(N, 1), H, V, operand_bytes, spec=spec, backward=backward)["ms"]
             for k in ("gemm", "triton")}
    return min(times, key=times.get)
