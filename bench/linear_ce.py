"""Benchmark linear_cross_entropy backends: forward + backward time and peak memory.

    python -m bench.linear_ce                 # CPU: reduced grid, torch backends
    python -m bench.linear_ce --grid gpu      # CUDA: N in {4096, 16384} x (H, V) of real models,
                                              # and 16384 x 2048 x 248320 (CCE_SHAPE)
    python -m bench.linear_ce --grid check    # CUDA: three of those (bench/gpu_check.sh)
    python -m bench.linear_ce --shapes 16384x2048x248320 --backends triton liger cce
    python -m bench.linear_ce --table bench/results/linear_ce.jsonl   # the last run's table

On a CPU every (shape, backend) runs in its own process so peak memory is its own; on CUDA the
allocator's peak is reset before each measurement. Each row is appended to the JSONL file
(default bench/results/linear_ce.jsonl) as soon as it is measured, with the machine, versions,
date and run id; a row that fails (out of memory, an exception) records its error and the run goes
on. Then a markdown table, with time and memory relative to the full-logits reference, and last
the JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from bench.harness import (append_jsonl, guarded, machine, markdown_table, measure, read_runs,
                           run_isolated)

# the large-vocabulary shape of the comparison with Cut Cross-Entropy and Liger (a 248k vocabulary)
CCE_SHAPE = (16384, 2048, 248320)
GRIDS = {
    "cpu": [(8192, 512, 32768), (2048, 256, 8192)],
    "gpu": [(n, h, v) for n in (4096, 16384)
            for h, v in ((1536, 151936), (2048, 128256), (4096, 128256))] + [CCE_SHAPE],
    # bench/gpu_check.sh's slice: a short and a long pack, and the CCE comparison
    "check": [(4096, 1536, 151936), (16384, 2048, 128256), CCE_SHAPE],
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
    fn = _loss_fn(backend)  # ImportError: the row says "skipped"
    hidden = (torch.randn(N, H, device=device) / 4).to(dt).requires_grad_()
    weight = (torch.randn(V, H, device=device) / H ** 0.5).to(dt).requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    targets[::7] = -100  # prompt tokens, as in a real batch

    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets).backward()
    return measure(step, device, repeats=repeats)


def render(rows: list[dict]) -> str:
    """The markdown table of one run's rows (time and memory relative to the reference row of the
    same shape, time relative to the GEMM floor)."""
    if not rows:
        return "linear_ce: no rows"
    info = rows[0]
    ref = {(r["N"], r["H"], r["V"]): r for r in rows if r["backend"] == "reference" and "ms" in r}
    table = []
    for r in rows:
        shape = f"{r['N']}x{r['H']}x{r['V']}"
        base = ref.get((r["N"], r["H"], r["V"]))
        if "ms" in r:
            table.append([shape, r["backend"], r["ms"], r["peak_mb"],
                          base["ms"] / r["ms"] if base else None,
                          r["peak_mb"] / base["peak_mb"] if base and base["peak_mb"] else None,
                          r["ms"] / r["gemm_floor_ms"], ""])
        else:
            table.append([shape, r["backend"], None, None, None, None, None,
                          r.get("skipped") or r.get("error")])
    head = (f"linear_ce fwd+bwd, {info['dtype']}, {info['device']}, torch {info['torch']}, "
            f"{info['date']}; matmul rate {info['gemm_tflops']:.1f} TFLOP/s\n\n")
    return head + markdown_table(["N x H x V", "backend", "ms (median)", "peak MB",
                                  "speed vs reference", "memory / reference", "x GEMM floor",
                                  "note"], table)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        n, h, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxHxV, got {text!r}") from None
    return n, h, v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), default=None)
    p.add_argument("--shapes", type=_shape, nargs="*", default=None, help="NxHxV ... (instead of a grid)")
    p.add_argument("--backends", nargs="*", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/linear_ce.jsonl")
    p.add_argument("--table", metavar="JSONL", help="print the table of the last run in JSONL and exit")
    p.add_argument("--one", nargs=4, metavar=("BACKEND", "N", "H", "V"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        print(render(read_runs(args.table, "linear_ce")))
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if args.one:
        b, n, h, v = args.one
        print(json.dumps(guarded(one, b, int(n), int(h), int(v), dtype, device, args.repeats)))
        return 0
    grid = args.shapes or GRIDS[args.grid or ("gpu" if device == "cuda" else "cpu")]
    backends = args.backends or (GPU_BACKENDS if device == "cuda" else CPU_BACKENDS)
    info = machine()
    rate = gemm_tflops(device, dtype)
    rows = []
    for N, H, V in grid:
        # the GEMM floor: 6 N H V flops (the forward and two backward products) at the rate a
        # large matmul of this dtype reaches on this device, measured in this run
        floor_ms = 6 * N * H * V / (rate * 1e12) * 1e3
        for b in backends:
            if device == "cuda":  # the allocator's peak is reset per measurement: no new process
                torch.cuda.empty_cache()
                r = guarded(one, b, N, H, V, dtype, device, args.repeats)
            else:  # a CPU peak (max RSS) only rises: each measurement in its own process
                r = run_isolated("bench.linear_ce", ["--one", b, str(N), str(H), str(V), "--dtype",
                                                      dtype, "--repeats", str(args.repeats)])
            row = {"bench": "linear_ce", "backend": b, "N": N, "H": H, "V": V, "dtype": dtype,
                   **info, **r, "gemm_floor_ms": floor_ms, "gemm_tflops": rate}
            append_jsonl(args.out, [row])  # at once: a run cut short keeps what it measured
            rows.append(row)
            print(f"  {b:16s} N={N} H={H} V={V}: {r}", file=sys.stderr)
    print("\n" + render(rows))
    print(json.dumps({"bench": "linear_ce", "machine": info, "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
