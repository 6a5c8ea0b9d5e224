"""Benchmark linear_cross_entropy backends: forward + backward time and peak memory.

    python -m polyfast.bench.linear_ce               # CPU: reduced grid, torch backends
    python -m polyfast.bench.linear_ce --grid gpu    # CUDA: N in {4096, 16384} x the Qwen2.5-1.5B
                                                     # and Llama-3.2-3B heads, and 16384 x 2048
                                                     # x 248320
    python -m polyfast.bench.linear_ce --grid check  # CUDA: our fused backends, CCE and Liger at
                                                     # three of those (bench/gpu_check.sh)
    python -m polyfast.bench.linear_ce --shapes 16384x2048x248320 --backends gemm triton liger cce
    python -m polyfast.bench.linear_ce --table bench/results/linear_ce.jsonl   # the last run's table

On a CPU every (shape, backend) runs in its own process so peak memory is its own; on CUDA the
allocator's peak is reset before each measurement. Each row is appended to the JSONL file
(default bench/results/linear_ce.jsonl) as soon as it is measured, with the machine, versions,
date and run id; a row that fails (out of memory, an exception) records its error and the run goes
on. Then a markdown table, with time and memory relative to the full-logits reference and time
relative to Cut Cross-Entropy where those rows ran, and last the JSON summary line.

Backends: "triton" is the fused kernel with its default gradient filter (2^-12 for 16-bit),
"triton_exact" the same with the filter off, "gemm" the vocabulary-chunked cuBLAS backend, the rest
are named after their libraries. The inputs are random (hidden ~ N(0, s^2), s = --hidden-std,
default 0.25; head rows ~ N(0, 1/H)): with the default every row's softmax is near uniform
(p ~ 1/V), below any filter threshold, so the filtered kernels (ours and CCE's) skip nearly all
gradient products; --hidden-std 4 makes rows peaked enough that nearly every tile passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from polyfast.model import DTYPES
from polyfast.tables import markdown_table

from .harness import RESULTS, append_jsonl, guarded, machine, measure, read_runs, run_isolated

# the large-vocabulary shape of the comparison with Cut Cross-Entropy and Liger (a 248k vocabulary)
CCE_SHAPE = (16384, 2048, 248320)
HEADS = {"qwen2.5-1.5b": (1536, 151936), "llama-3.2-3b": (3072, 128256)}
GRIDS = {
    "cpu": [(8192, 512, 32768), (2048, 256, 8192)],
    "gpu": [(n, h, v) for n in (4096, 16384) for h, v in HEADS.values()] + [CCE_SHAPE],
    # bench/gpu_check.sh's slice: the CCE comparison first, then a long pack of each head
    "check": [CCE_SHAPE] + [(16384, h, v) for h, v in HEADS.values()],
}
CPU_BACKENDS = ["reference", "torch", "torch_f_chunked", "torch_f"]
# fastest first: a run cut short by a time limit keeps the comparisons that matter
GPU_BACKENDS = ["gemm", "triton", "triton_exact", "cce", "liger", "torch_f_chunked", "torch",
                "compile", "reference"]
CHECK_BACKENDS = ["gemm", "triton", "triton_exact", "cce", "liger"]
# the hidden states' standard deviation = the logits' (head rows have unit norm on average):
# 0.25 gives near-uniform rows; 4 gives peaked ones whose largest probabilities pass any filter
HIDDEN_STD = 0.25


def _loss_fn(backend: str):
    """A callable (hidden, weight, targets) -> scalar summed CE, or raise ImportError."""
    import polyfast.kernels.linear_ce as lce
    from polyfast.kernels import linear_ce_reference, linear_cross_entropy
    if backend in ("reference", "torch", "triton", "gemm"):
        if backend not in lce.BACKENDS:
            raise ImportError(f"polyfast has no {backend!r} backend in this version")
        return lambda h, w, t: linear_cross_entropy(h, w, t, backend=backend)
    if backend == "triton_exact":
        return lambda h, w, t: linear_cross_entropy(h, w, t, backend="triton", filter_eps=0.0)
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


def copy_tbps(device: str) -> float:
    """The elementwise bandwidth of this device (TB/s: bytes read + written by a large copy)."""
    n = 2**28 if device == "cuda" else 2**24  # 512 MiB of bf16 on a GPU
    x = torch.ones(n, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    r = measure(lambda: y.copy_(x), device, repeats=5)
    return 2 * x.nbytes / (r["ms"] * 1e-3) / 1e12


def one(backend: str, N: int, H: int, V: int, dtype: str, device: str, repeats: int,
        hidden_std: float = HIDDEN_STD) -> dict:
    """Measure one (backend, shape) in this process."""
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    fn = _loss_fn(backend)  # ImportError: the row says "skipped"
    hidden = (torch.randn(N, H, device=device) * hidden_std).to(dt).requires_grad_()
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

    def by_shape(backend):
        return {(r["N"], r["H"], r["V"]): r for r in rows if r["backend"] == backend and "ms" in r}
    ref, cce = by_shape("reference"), by_shape("cce")
    table = []
    for r in rows:
        key = (r["N"], r["H"], r["V"])
        base, c = ref.get(key), cce.get(key)
        if "ms" in r:
            table.append(["x".join(map(str, key)), r["backend"], r["ms"], r["peak_mb"],
                          base["ms"] / r["ms"] if base else None,
                          r["peak_mb"] / base["peak_mb"] if base and base["peak_mb"] else None,
                          r["ms"] / c["ms"] if c else None, r["ms"] / r["gemm_floor_ms"], ""])
        else:
            table.append(["x".join(map(str, key)), r["backend"], None, None, None, None, None,
                          None, r.get("skipped") or r.get("error")])
    head = (f"linear_ce fwd+bwd, {info['dtype']}, hidden std {info.get('hidden_std', HIDDEN_STD)}, "
            f"{info['device']}, torch {info['torch']}, "
            f"{info['date']}; matmul rate {info['gemm_tflops']:.1f} TFLOP/s\n\n")
    return head + markdown_table(["N x H x V", "backend", "ms (median)", "peak MB",
                                  "speed vs reference", "memory / reference", "time / CCE",
                                  "x GEMM floor", "note"], table)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        n, h, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxHxV, got {text!r}") from None
    return n, h, v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), default=None)
    p.add_argument("--shapes", type=parse_shape, nargs="*", default=None, help="NxHxV ... (instead of a grid)")
    p.add_argument("--backends", nargs="*", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden-std", type=float, default=HIDDEN_STD,
                   help="standard deviation of the random hidden states (= of the logits)")
    p.add_argument("--out", default=os.path.join(RESULTS, "linear_ce.jsonl"),
                   help="JSONL file the rows are appended to "
                   "(default bench/results/linear_ce.jsonl)")
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
        print(json.dumps(guarded(one, b, int(n), int(h), int(v), dtype, device, args.repeats,
                                 args.hidden_std)))
        return 0
    grid = args.shapes or GRIDS[args.grid or ("gpu" if device == "cuda" else "cpu")]
    backends = args.backends or (CPU_BACKENDS if device != "cuda" else
                                 CHECK_BACKENDS if args.grid == "check" else GPU_BACKENDS)
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
                r = guarded(one, b, N, H, V, dtype, device, args.repeats, args.hidden_std)
            else:  # a CPU peak (max RSS) only rises: each measurement in its own process
                r = run_isolated("polyfast.bench.linear_ce",
                                 ["--one", b, str(N), str(H), str(V), "--dtype", dtype,
                                  "--repeats", str(args.repeats),
                                  "--hidden-std", str(args.hidden_std)])
            row = {"bench": "linear_ce", "backend": b, "N": N, "H": H, "V": V, "dtype": dtype,
                   "hidden_std": args.hidden_std,
                   **info, **r, "gemm_floor_ms": floor_ms, "gemm_tflops": rate}
            append_jsonl(args.out, [row])  # at once: a run cut short keeps what it measured
            rows.append(row)
            print(f"  {b:16s} N={N} H={H} V={V}: {r}", file=sys.stderr)
    print("\n" + render(rows))
    print(json.dumps({"bench": "linear_ce", "machine": info, "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
