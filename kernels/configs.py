"""Launch configurations of the Triton kernels: the pinned block sizes per GPU family, the optional
autotuner, the H padding every fused launcher applies, and the list of launch variants that
``python -m polyfast.bench.compile_check`` compiles for sm_90 / sm_80 / sm_86 without a GPU.

A config is (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages), pinned per GPU family, kernel
("fwd" / "bwd": the fused linear cross-entropy, "joint": joint_logprobs' forward) and operand width
("16": bf16 / fp16 on tensor cores; "32": fp32). Each was chosen with the compile check for no
register spills and shared memory within the architecture's limit (the fp32 ones are smaller: true
fp32 products unroll into FMA chains that spill at the 16-bit tile sizes). POLYFAST_AUTOTUNE=1
times a few candidates on first use of each shape instead and keeps the fastest.

H reaches the fused kernels padded to a multiple of the largest H block (``padded``; real models'
hidden sizes already are), so the kernels need no H masks and every row load is 16-byte aligned.
"""

from __future__ import annotations

import importlib
import itertools
import os
from dataclasses import dataclass

import torch

from .checks import SIXTEEN_BIT

CONFIGS = {
    # "jointshared": the joint forward sweeping one head for two models (two accumulators, so
    # half the rows of "joint" keep the registers from spilling)
    "hopper": {"fwd16": (128, 128, 32, 8, 4), "bwd16": (128, 128, 64, 8, 3),
               "joint16": (128, 64, 64, 8, 3), "jointshared16": (64, 64, 64, 8, 3),
               "fwd32": (64, 128, 32, 8, 2), "bwd32": (64, 64, 16, 8, 2),
               "joint32": (64, 128, 32, 8, 2), "jointshared32": (64, 64, 32, 8, 2)},
    "ampere": {"fwd16": (128, 128, 32, 8, 3), "bwd16": (128, 128, 32, 8, 2),
               "joint16": (128, 64, 64, 8, 3), "jointshared16": (64, 64, 64, 8, 3),
               "fwd32": (64, 128, 32, 8, 2), "bwd32": (64, 64, 32, 8, 2),
               "joint32": (64, 128, 32, 8, 2), "jointshared32": (64, 64, 32, 8, 2)},
    "other": {"fwd16": (64, 128, 32, 4, 2), "bwd16": (64, 64, 32, 4, 2),
              "joint16": (64, 64, 32, 8, 2), "jointshared16": (32, 64, 32, 8, 2),
              "fwd32": (64, 64, 32, 4, 2), "bwd32": (64, 64, 32, 8, 2),
              "joint32": (64, 64, 16, 8, 1), "jointshared32": (32, 64, 16, 8, 1)},
    "interpret": {k + w: (16, 32, 16, 1, 1) for k in ("fwd", "bwd", "joint", "jointshared")
                  for w in ("16", "32")},
}
# the GPU architecture each family's configs are checked on (bench.compile_check)
FAMILY_ARCH = {"hopper": 90, "ampere": 80, "other": 86}
AUTOTUNE_CANDIDATES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3),
                       (128, 128, 32, 8, 4), (64, 256, 32, 8, 3)]
GROUP_N = 8  # row blocks that sweep the vocabulary together in the fused backward
# (BLOCK_R, BLOCK_C, num_warps) of the "gemm" backend's elementwise kernels on a GPU
ELEMENTWISE_CONFIGS = {"stats": (16, 256, 8), "grad": (8, 256, 4)}
_tuned: dict[tuple, tuple] = {}


def family(device: torch.device) -> str:
    """The config family of a device: "hopper" (sm_90), "ampere" (sm_80), "other" (other CUDA
    GPUs), "interpret" (a CPU under TRITON_INTERPRET=1)."""
    if device.type != "cuda":
        return "interpret"
    cap = torch.cuda.get_device_capability(device)
    return "hopper" if cap[0] == 9 else "ampere" if cap == (8, 0) else "other"


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def config_key(kind: str, dtype: torch.dtype) -> str:
    """The ``CONFIGS`` key of a kernel kind ("fwd" / "bwd" / "joint") for operands of ``dtype``."""
    return kind + ("16" if dtype in SIXTEEN_BIT else "32")


def pinned_config(kind: str, device: torch.device, dtype: torch.dtype) -> tuple:
    return CONFIGS[family(device)][config_key(kind, dtype)]


def launch_config(kind: str, device: torch.device, dtype: torch.dtype, key: tuple, run) -> tuple:
    """The pinned config, or with POLYFAST_AUTOTUNE=1 the fastest of a few candidates, timed once
    per (kind, shape key) by ``run(config)``."""
    if device.type != "cuda" or os.environ.get("POLYFAST_AUTOTUNE", "0") in ("", "0"):
        return pinned_config(kind, device, dtype)
    full = (kind, device.index, dtype, *key)
    if full not in _tuned:
        from triton.testing import do_bench
        times = {}
        for cfg in AUTOTUNE_CANDIDATES:
            try:
                times[cfg] = do_bench(lambda: run(cfg), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a config that does not fit (shared memory): skipped
                continue
        _tuned[full] = min(times, key=times.get) if times else pinned_config(kind, device, dtype)
    return _tuned[full]


def elementwise_config(kind: str, device: torch.device, N: int) -> tuple:
    """(BLOCK_R, BLOCK_C, num_warps) of a "gemm" elementwise kernel. "stats" programs own whole
    rows: fewer rows per program when N is small, so that the grid still covers the GPU."""
    if device.type != "cuda":  # the interpreter: few, large programs
        return 16, 64, 1
    if kind == "grad":
        return ELEMENTWISE_CONFIGS["grad"]
    br, bc, warps = ELEMENTWISE_CONFIGS["stats"]
    while br > 1 and -(-N // br) < 4 * num_sms(device):
        br //= 2
    return br, bc, warps


def h_multiple(device: torch.device) -> int:
    """Hidden sizes reach the kernels padded to a multiple of this (the largest BLOCK_H a config
    or the autotuner may use on ``device``): the kernels need no H masks, and rows of a multiple of
    64 elements keep every load 16-byte aligned and vectorised. Real models' hidden sizes already
    are multiples of 64; only odd test shapes pay for a padded copy."""
    fam = family(device)
    sizes = [c[2] for c in CONFIGS[fam].values()]
    if fam != "interpret":
        sizes += [c[2] for c in AUTOTUNE_CANDIDATES]
    return max(sizes)


def padded_size(H: int, device: torch.device) -> int:
    m = h_multiple(device)
    return -(-H // m) * m


def padded(x: torch.Tensor, dtype: torch.dtype, cols: int) -> torch.Tensor:
    """x (R, H) as a contiguous, 16-byte aligned (R, cols) tensor of ``dtype``, zero-padded on the
    right: x itself when it already is one, else one copy (a plain cast when no padding is due)."""
    if x.shape[1] == cols:
        out = x.to(dtype).contiguous()
        return out if out.data_ptr() % 16 == 0 else out.clone()  # a fresh tensor is aligned
    out = x.new_zeros((x.shape[0], cols), dtype=dtype)
    out[:, :x.shape[1]] = x
    return out


# ---------------------------------------------------------------------------------------------
# every launch variant, for the compile check

# kernel name -> (module, the @triton.jit function's name, config kind, the variants' "what")
KERNELS = {
    "linear_ce.fwd": ("fused_fwd", "fwd_kernel", "fwd", ["-"]),
    # the gradient filter is on by default for 16-bit operands; exact (off) is one switch away
    "linear_ce.bwd": ("fused_bwd", "bwd_kernel", "bwd",
                      ["dh filter", "dw filter", "dh+dw filter", "dh+dw"]),
    "joint.fwd": ("joint_logprobs", "joint_fwd_kernel", "joint",
                  ["models=1", "models=2", "models=3", "models=2 shared", "models=3 shared"]),
    "gemm.stats": ("gemm", "chunk_stats_kernel", "stats", ["-"]),
    "gemm.grad": ("gemm", "chunk_grad_kernel", "grad", ["-"]),
}


@dataclass
class Variant:
    """One launch the kernels can make: a kernel with its pinned config, operand dtype, softcap
    and gradients (bwd) or models (joint)."""

    kernel: str          # a KERNELS name
    arch: int
    family: str
    dtype: str           # bf16 | fp16 | fp32 (ieee products) | tf32
    softcap: bool
    what: str            # bwd: dh | dw | dh+dw, "filter" when the gradient filter is compiled
                         # in; joint: models=M, "shared" when models 0 and 1 read one head
                         # (LoRA); others: -
    config: tuple        # (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages); the elementwise
                         # "gemm" kernels: (BLOCK_R, BLOCK_C, 0, num_warps, 1)

    @property
    def matmul(self) -> bool:
        """Whether the kernel multiplies matrices (the "gemm" backend's kernels are elementwise:
        its products run in cuBLAS)."""
        return not self.kernel.startswith("gemm.")

    def kernel_fn(self):
        module, name, _, _ = KERNELS[self.kernel]
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)

    def signature(self) -> tuple[dict, dict]:
        """(argument types, constexprs) as the kernel's launcher passes them: the kernel module's
        SIGNATURES entry, its operand pointers typed by ``dtype``."""
        module, _, _, _ = KERNELS[self.kernel]
        spec = importlib.import_module(f"{__package__}.{module}").SIGNATURES[self.kernel]
        ptr = "*" + ("fp32" if self.dtype == "tf32" else self.dtype)
        types = {k: ptr if t == "*operand" else t for k, t in spec["types"].items()}
        bn, bv, bh, _, _ = self.config
        if self.matmul:
            precision = {"fp32": "ieee", "tf32": "tf32"}.get(self.dtype)
            blocks = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "DOT_PRECISION": precision}
        else:
            blocks = {"BLOCK_R": bn, "BLOCK_C": bv}
        return types, {**spec["constexprs"](self), "HAS_SOFTCAP": self.softcap, **blocks}


def variants(archs, dtypes) -> list[Variant]:
    """Every pinned launch for these architectures and operand dtypes (bf16, fp16, fp32, tf32)."""
    out = []
    by_arch = {a: f for f, a in FAMILY_ARCH.items()}
    for arch, dtype, cap in itertools.product(archs, dtypes, (False, True)):
        fam = by_arch[arch]
        width = "16" if dtype in ("bf16", "fp16") else "32"
        for kernel, (_, _, kind, whats) in KERNELS.items():
            for what in whats:
                if kind in ELEMENTWISE_CONFIGS:
                    br, bc, warps = ELEMENTWISE_CONFIGS[kind]
                    cfg = (br, bc, 0, warps, 1)
                else:
                    cfg = CONFIGS[fam][kind + ("shared" if what.endswith("shared") else "") + width]
                out.append(Variant(kernel, arch, fam, dtype, cap, what, cfg))
    return out
