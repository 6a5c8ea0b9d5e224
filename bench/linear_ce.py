"""Benchmark linear_cross_entropy backends: forward + backward time and peak memory.

    python -m bench.linear_ce                 # CPU: reduced grid, torch backends
    python -m bench.linear_ce --grid gpu      # CUDA: N in {4096, 16384} x (H, V) of real models

On a CPU every (shape, backend) runs in its own process so peak memory is its own; on CUDA the
allocator's peak is reset before each measurement. Rows are appended to
bench/results/linear_ce.jsonl with the machine, versions and date; a markdown table is printed,
with time and memory relative to the full-logits reference; the last line is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.harness import append_jsonl, machine, markdown_table, measure, run_isolated

GRIDS = {
    "cpu": [(8192, 512, 32768), (2048, 256, 8192)],
    "gpu": [(n, h, v) for n in (4096, 16384)
            for h, v in ((1536, 151936), (2048, 128256), (4096, 128256))],
}
CPU_BACKENDS = ["reference", "torch", "torch_f_chunked", "torch_f"]
GPU_BACKENDS = ["reference", "compile", "torch", "triton", "torch_f_chunked", "liger", "cce"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _loss_fn(backend: str):
    """A callable (hidden, weight, targets) -> scalar summed CE, or raise ImportError."""
    from polyfast.kernels import linear_cross_entropy, linear_ce_reference
    import polyfast.kernels.linear_ce as lce
    if backend in ("reference", "torch", "triton"):
        if backend not in lce.BACKENDS:
            raise ImportError(f"polyfast has no {backend!r} backend in this version")
        return lambda h, w, t: linear_cross_entropy(h, w, t, backend=backend)
    if backend == "compile":
        return torch.compile(lambda h, w, t: linear_ce_reference(h, w, t))
    if backend in ("torch_f", "torch_f_chunked"):
        f = getattr(torch.nn.functional, "linear_cross_entropy", None)
        if f is None:
            raise ImportError("torch.nn.functional.linear_cross_entropy needs a newer torch")
        if backend == "torch_f":
            return lambda h, w, t: f(h, w, t, reduction="sum")
        from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions
        opts = LinearCrossEntropyOptions()
        return lambda h, w, t: f(h, w, t, reduction="sum", options=opts)
    if backend == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t, reduction="sum")
    if backend == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce
        return lambda h, w, t: cce(h, w, t, reduction="sum")
    raise ValueError(backend)


def gemm_tflops(device: str, dtype: str) -> float:
    """The matmul rate of this device and dtype (TFLOP/s), from a large square product."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(DTYPES[dtype])
    b = torch.randn(n, n, device=device).to(DTYPES[dtype])
    r = measure(lambda: a @ b, device, repeats=5)
    return 2 * n ** 3 / (r["ms"] * 1e-3) / 1e12


def one(backend: str, N: int, H: int, V: int, dtype: str, device: str, repeats: int) -> dict:
    """Measure one (backend, shape) in this process."""
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    try:
        fn = _loss_fn(backend)
    except ImportError as e:
        return {"skipped": str(e)}
    hidden = (torch.randn(N, H, device=device) / 4).to(dt).requires_grad_()
    weight = (torch.randn(V, H, device=device) / H ** 0.5).to(dt).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    targets[::7] = -100  # prompt tokens, as in a real batch

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets).backward()
    return measure(step, device, repeats=repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), default=None)
    p.add_argument("--backends", nargs="*", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/linear_ce.jsonl")
    p.add_argument("--one", nargs=4, metavar=("BACKEND", "N", "H", "V"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if args.one:
        b, n, h, v = args.one
        print(json.dumps(one(b, int(n), int(h), int(v), dtype, device, args.repeats)))
        return 0
    grid = GRIDS[args.grid or ("gpu" if device == "cuda" else "cpu")]
    backends = args.backends or (GPU_BACKENDS if device == "cuda" else CPU_BACKENDS)
    info = machine()
    rate = gemm_tflops(device, dtype)
    rows, table = [], []
    for N, H, V in grid:
        ref = None
        for b in backends:
            if device == "cuda":  # the allocator's peak is reset per measurement: no new process
                torch.cuda.empty_cache()
                try:
                    r = one(b, N, H, V, dtype, device, args.repeats)
                except torch.OutOfMemoryError:
                    r = {"error": "out of memory"}
                    torch.cuda.empty_cache()
            else:  # a CPU peak (max RSS) only rises: each measurement in its own process
                r = run_isolated("bench.linear_ce", ["--one", b, str(N), str(H), str(V), "--dtype",
                                                      dtype, "--repeats", str(args.repeats)])
            row = {"bench": "linear_ce", "backend": b, "N": N, "H": H, "V": V, "dtype": dtype, **info, **r}
            rows.append(row)
            if "ms" in r and b == "reference":
                ref = r
            # the GEMM floor: 6 N H V flops (the forward and two backward products) at the rate
            # a large matmul of this dtype reaches on this device, measured in this run
            floor_ms = 6 * N * H * V / (rate * 1e12) * 1e3
            row["gemm_floor_ms"], row["gemm_tflops"] = floor_ms, rate
            if "ms" in r:
                table.append([f"{N}x{H}x{V}", b, r["ms"], r["peak_mb"],
                              ref["ms"] / r["ms"] if ref else None,
                              r["peak_mb"] / ref["peak_mb"] if ref and ref["peak_mb"] else None,
                              r["ms"] / floor_ms, ""])
            else:
                table.append([f"{N}x{H}x{V}", b, None, None, None, None, None,
                              r.get("skipped") or r.get("error")])
            print(f"  {b:16s} N={N} H={H} V={V}: {r}", file=sys.stderr)
    append_jsonl(args.out, rows)
    print(f"\nlinear_ce fwd+bwd, {dtype}, {info['device']}, torch {info['torch']}, {info['date']}; "
          f"matmul rate {rate:.1f} TFLOP/s\n")
    print(markdown_table(["N x H x V", "backend", "ms (median)", "peak MB", "speed vs reference",
                          "memory / reference", "x GEMM floor", "note"], table))
    print(json.dumps({"bench": "linear_ce", "machine": info, "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
