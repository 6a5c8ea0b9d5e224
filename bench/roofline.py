"""Cost model of the loss head's fused backends: what a forward + backward should take on a GPU
(an H100 unless ``--device`` names another the model knows).

    python -m polyfast.bench.roofline     # the CCE comparison shape and the head shapes
    python -m polyfast.bench.roofline --shapes 65536x1536x151936 --pass-fraction 0.05
    python -m polyfast.bench.roofline --device H200
    python -m polyfast.bench.roofline --calibrate   # a GPU: its measured matmul rate and bandwidth

Per backend and shape: FLOPs, HBM bytes, fp32 atomic bytes, the op's own peak memory (outputs and
16-bit gradients included, inputs not) and the predicted time, from ``polyfast.kernels.cost_model.predict``
(each phase max(FLOPs / peak, bytes / bandwidth), the phases and the atomics added; the formulas
are in its docstring); ``--calibrate`` replaces the datasheet's bf16 rate and bandwidth by what
this GPU measures (a 8192^3 matmul, a 512 MiB copy), ``--matmul-tflops`` / ``--tbps`` by given
ones. "triton" gets two rows: every tile past the gradient filter (pass fraction 1, what
``backend="auto"`` assumes) and the given pass fraction (default 0: every tile filtered, the floor
of a filtered run). The last line names the backend that "auto"
picks at 16384 x 2048 x 248320 (bf16):

    roofline: BACKEND N=16384 H=2048 V=248320: MS ms, GB GB

These are predictions; bench/linear_ce.py measures the same shapes (bench/RESULTS.md holds both).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from polyfast.kernels import cost_model
from polyfast.tables import markdown_table

from .linear_ce import CCE_SHAPE, copy_tbps, gemm_tflops, parse_shape

# the CCE comparison shape, a long pack of a Qwen2.5-1.5B / 7B-sized head, Llama-3.2-3B's head
SHAPES = [CCE_SHAPE, (65536, 1536, 151936), (16384, 1536, 151936), (16384, 3072, 128256)]


def rows(shapes, operand_bytes: int, pass_fraction: float, spec=cost_model.H100) -> list[list]:
    out = []
    for N, H, V in shapes:
        auto = cost_model.choose_fused(N, H, V, operand_bytes, spec=spec)
        runs = [("gemm", 1.0, "-"), ("triton", 1.0, "1 (none filtered)")]
        if pass_fraction != 1.0:
            runs.append(("triton", pass_fraction, f"{pass_fraction:g}"))
        for backend, f, label in runs:
            r = cost_model.predict(backend, N, H, V, operand_bytes, pass_fraction=f, spec=spec)
            out.append([f"{N}x{H}x{V}", backend + (" (auto)" if backend == auto and f == 1.0 else ""),
                        label, r["flops"] / 1e12, r["hbm_bytes"] / 1e9, r["atomic_bytes"] / 1e9,
                        r["memory_bytes"] / 1e9, r["ms"]])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=parse_shape, nargs="*", default=None, help="NxHxV ...")
    p.add_argument("--pass-fraction", type=float, default=0.0,
                   help="share of the fused backward's tiles past the gradient filter (extra row)")
    p.add_argument("--fp32", action="store_true", help="fp32 operands (IEEE products) instead of bf16")
    p.add_argument("--device", default="H100", choices=sorted(cost_model.DEVICES),
                   help="the GPU whose rates the model uses (default H100)")
    p.add_argument("--matmul-tflops", type=float,
                   help="the matmul rate to use for --fp32 or bf16 operands instead of the spec's")
    p.add_argument("--tbps", type=float, help="the memory bandwidth to use instead of the spec's")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this GPU's bf16 matmul rate and copy bandwidth and use them")
    args = p.parse_args(argv)
    if not 0.0 <= args.pass_fraction <= 1.0:
        p.error(f"--pass-fraction must be in [0, 1], got {args.pass_fraction}")
    b = 4 if args.fp32 else 2
    spec = cost_model.DEVICES[args.device]
    if args.calibrate:
        if not torch.cuda.is_available():
            p.error("--calibrate measures a CUDA GPU; this machine has none")
        args.matmul_tflops = gemm_tflops("cuda", "float32" if args.fp32 else "bfloat16")
        args.tbps = copy_tbps("cuda")
        spec = dataclasses.replace(spec, name=f"{torch.cuda.get_device_name()} as measured")
    if args.matmul_tflops or args.tbps:
        spec = dataclasses.replace(
            spec, tflops={**spec.tflops, b: args.matmul_tflops or spec.tflops[b]},
            tbps=args.tbps or spec.tbps)
    shapes = args.shapes or SHAPES
    print(f"linear_ce forward + backward, {'fp32' if args.fp32 else 'bf16'} operands, predicted for "
          f"{spec.name}: {spec.tflops[b]:g} TFLOP/s, {spec.tbps:g} TB/s (atomics at HBM "
          f"rate)\n")
    print(markdown_table(["N x H x V", "backend", "filter pass fraction", "TFLOP", "HBM GB",
                          "atomic GB", "memory GB", "predicted ms"],
                         rows(shapes, b, args.pass_fraction, spec)))
    N, H, V = CCE_SHAPE
    auto = cost_model.choose_fused(N, H, V, 2, spec=spec)
    r = cost_model.predict(auto, N, H, V, 2, spec=spec)
    print(f"\nroofline: {auto} N={N} H={H} V={V}: {r['ms']:.1f} ms, {r['memory_bytes'] / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
