"""Benchmark the joint policy / reference / critic log-prob pass of HDPO: forward + backward
(the policy's gradient) time and peak memory.

    python -m polyfast.bench.joint_logprobs             # CPU: reduced sizes, torch backends
    python -m polyfast.bench.joint_logprobs --grid gpu  # CUDA: 3 models, N=8192, H=1536,
                                                        # V=151936

Rows: our Triton kernel (one launch), our torch twin, (a) three full-logits reference passes,
(b) three calls of our fused cross-entropy with reduction "none" (backend "auto": what
``joint_logprobs(backend="auto")`` runs on CUDA, "separate") plus torch segment sums,
(c) Liger-Kernel's fused linear DPO loss on the same pairs (policy + reference; padded rows of equal
length, as its interface takes them). Sequences are 32 pairs' sides of equal length (a quarter
prompt), so (c) sees no padding. Each row goes to bench/results/joint_logprobs.jsonl (--out) as
soon as it is measured, a failing row with its error; ``--table JSONL`` prints a run's table.

    python -m polyfast.bench.joint_logprobs --lora      # LoRA: policy + adapters-off reference

``--lora``: two models reading one frozen head (the same tensor), the policy's hidden states
trainable: ``lora_triton`` (one launch sweeping each head tile once for both), ``lora_triton_twice``
(the same launch reading the head once per model) and ``lora_separate`` (one fused call per model,
what ``auto`` runs); speed relative to ``lora_separate``.
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

GRIDS = {"cpu": [(2048, 256, 8192)], "gpu": [(8192, 1536, 151936)]}
CPU_BACKENDS = ["reference", "torch", "ce_none"]
GPU_BACKENDS = ["triton", "torch", "reference", "ce_none", "liger_dpo"]
LORA_BACKENDS = ["lora_triton", "lora_triton_twice", "lora_separate"]
MODELS = 3
SEQS = 32


def _inputs(N, H, V, dtype, device, lora=False):
    torch.manual_seed(0)
    hs = [(torch.randn(N, H, device=device) / 4).to(dtype) for _ in range(2 if lora else MODELS)]
    ws = [(torch.randn(V, H, device=device) / H ** 0.5).to(dtype) for _ in range(1 if lora else MODELS)]
    hs[0].requires_grad_()
    if lora:  # one frozen head for the policy and its adapters-off reference
        ws = [ws[0], ws[0]]
    else:
        ws[0].requires_grad_()
    targets = torch.randint(0, V, (N,), device=device)
    L = N // SEQS
    seg = torch.arange(SEQS, device=device).repeat_interleave(L)
    seg = torch.where(torch.arange(N, device=device) % L < L // 4, -1, seg)  # prompts
    return hs, ws, targets, seg


def _step_fn(backend, hs, ws, targets, seg):
    from polyfast.kernels import joint_logprobs, joint_logprobs_triton, linear_cross_entropy
    if backend in ("lora_triton", "lora_triton_twice"):
        shared = backend == "lora_triton"
        return lambda: joint_logprobs_triton(hs, ws, targets, seg, SEQS, shared_head=shared)[
            0][0].sum().backward()
    if backend == "lora_separate":
        impl = "separate" if targets.is_cuda else "torch"
        return lambda: joint_logprobs(hs, ws, targets, seg, SEQS, backend=impl)[0][0].sum().backward()
    if backend in ("triton", "torch", "reference"):
        return lambda: joint_logprobs(hs, ws, targets, seg, SEQS, backend=backend)[0][0].sum().backward()
    if backend == "ce_none":
        def run():
            t = torch.where(seg >= 0, targets, -100)
            s = torch.where(seg >= 0, seg, 0)
            sums = []
            for m in range(MODELS):
                with torch.set_grad_enabled(m == 0):
                    lp = -linear_cross_entropy(hs[m], ws[m], t, reduction="none")
                    sums.append(lp.new_zeros(SEQS).index_add(0, s, lp))
            sums[0].sum().backward()
        return run
    if backend == "liger_dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        loss = LigerFusedLinearDPOLoss(beta=0.1)
        L = targets.numel() // SEQS
        x = hs[0].view(SEQS, L, -1)
        ref = hs[1].view(SEQS, L, -1)
        y = torch.where(seg >= 0, targets, -100).view(SEQS, L)
        return lambda: loss(ws[0], x, y, ref_input=ref, ref_weight=ws[1])[0].backward()
    raise ValueError(backend)


def one(backend, N, H, V, dtype, device, repeats):
    hs, ws, targets, seg = _inputs(N, H, V, DTYPES[dtype], device, backend.startswith("lora_"))
    fn = _step_fn(backend, hs, ws, targets, seg)  # ImportError: the row says "skipped"

    def step():
        for t in (hs[0], ws[0]):
            t.grad = None
        fn()
    return measure(step, device, repeats=repeats)


def render(rows: list[dict]) -> str:
    """The markdown table of one run's rows: time relative to (b) and to the GEMM floor."""
    if not rows:
        return "joint_logprobs: no rows"
    info = rows[0]
    def kind(r):
        return "lora" if r["backend"].startswith("lora_") else "full"
    base = {(kind(r), r["N"], r["H"], r["V"]): r["ms"] for r in rows
            if r["backend"] in ("ce_none", "lora_separate") and "ms" in r}
    table = []
    for r in rows:
        shape, b = f"{r['N']}x{r['H']}x{r['V']}", base.get((kind(r), r["N"], r["H"], r["V"]))
        if "ms" in r:
            table.append([shape, r["backend"], r["ms"], r["peak_mb"], b / r["ms"] if b else None,
                          r["ms"] / r["gemm_floor_ms"]])
        else:
            table.append([shape, r["backend"], None, None, None, r.get("skipped") or r.get("error")])
    head = (f"joint_logprobs fwd+bwd, {info['models']} models, {info['dtype']}, {info['device']}, "
            f"torch {info['torch']}, {info['date']}; matmul rate {info['gemm_tflops']:.1f} TFLOP/s\n\n")
    return head + markdown_table(["N x H x V", "backend", "ms (median)", "peak MB",
                                  "speed vs (b) 3x CE none (LoRA: vs lora_separate)",
                                  "x GEMM floor"], table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), default=None)
    p.add_argument("--backends", nargs="*", default=None)
    p.add_argument("--lora", action="store_true",
                   help="two models with one frozen head (LORA_BACKENDS)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(RESULTS, "joint_logprobs.jsonl"),
                   help="JSONL file the rows are appended to "
                   "(default bench/results/joint_logprobs.jsonl)")
    p.add_argument("--table", metavar="JSONL", help="print the table of the last run in JSONL and exit")
    p.add_argument("--one", nargs=4, metavar=("BACKEND", "N", "H", "V"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.table:
        print(render(read_runs(args.table, "joint_logprobs")))
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    if args.one:
        b, n, h, v = args.one
        print(json.dumps(guarded(one, b, int(n), int(h), int(v), dtype, device, args.repeats)))
        return 0
    from .linear_ce import gemm_tflops
    info = machine()
    rate = gemm_tflops(device, dtype)
    rows = []
    for N, H, V in GRIDS[args.grid or ("gpu" if device == "cuda" else "cpu")]:
        # the GEMM floor: the forward head products and the policy's backward ones (two; with
        # LoRA one: the head is frozen)
        models = 2 if args.lora else MODELS
        floor_ms = 2 * N * H * V * (models + (1 if args.lora else 2)) / (rate * 1e12) * 1e3
        if args.lora:  # (the Triton rows need a GPU: the interpreter would take hours here)
            default = LORA_BACKENDS if device == "cuda" else ["lora_separate"]
        else:
            default = GPU_BACKENDS if device == "cuda" else CPU_BACKENDS
        for b in args.backends or default:
            if device == "cuda":
                torch.cuda.empty_cache()
                r = guarded(one, b, N, H, V, dtype, device, args.repeats)
            else:
                r = run_isolated("polyfast.bench.joint_logprobs",
                                 ["--one", b, str(N), str(H), str(V),
                                  "--repeats", str(args.repeats)])
            row = {"bench": "joint_logprobs", "backend": b, "N": N, "H": H, "V": V,
                   "models": models, "dtype": dtype, **info, **r, "gemm_floor_ms": floor_ms,
                   "gemm_tflops": rate}
            append_jsonl(args.out, [row])  # at once: a run cut short keeps what it measured
            rows.append(row)
            print(f"  {b}: {r}", file=sys.stderr)
    print("\n" + render(rows))
    print(json.dumps({"bench": "joint_logprobs", "machine": info, "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
