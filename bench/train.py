"""End-to-end training throughput: polyfast against the authors' setup, side by side in one run.

    python -m polyfast.bench.train                     # CPU: the demo model on the demo data
    python -m polyfast.bench.train --model qwen2.5-1.5b --max-tokens 8192 --steps 8   # a GPU
    python -m polyfast.bench.train --mode hdpo --data sample --limit 600 --max-tokens 4096 --steps 0
                                  # prefix sharing: one epoch on 600 records of the authors' sample

Five modes (three more on request), each in a fresh process (so that peak memory is its own), same
init, same data:

  sft   polyfast   SFTTrainer: bucket packs of ``--max-tokens``, varlen attention, fused loss kernel
  sft   baseline   the authors' setup: one example per forward (batch of one), SDPA, the model's own
                   full-vocabulary logits and loss, the same number of examples per optimizer step
  hdpo  polyfast   HDPOTrainer: group packs with each prompt once (prefix sharing), one joint
                   log-prob kernel for policy and live reference
  hdpo  unshared   the same with ``hdpo.prefix_sharing: false``: the prompt once per response
  hdpo  baseline   one pair per forward (chosen and rejected padded into a batch of two), full
                   logits -> log_softmax -> gather, a separate reference forward every step
  hdpo  precomputed  hdpo:polyfast with ``hdpo.reference: precomputed``: the reference's log-probs
                   computed once before timing (no reference forward in a step)
  sft   lora       sft:polyfast with LoRA adapters (``--lora-rank``, alpha 2r, every projection of
                   the trunk): only the adapters train
  hdpo  lora       hdpo:polyfast with LoRA: the reference is the policy with its adapters off (no
                   second copy of the weights)

A polyfast mode takes the model options as suffixes, measured side by side with the plain mode:
``sft:polyfast+liger`` (``model.liger``), ``+compile`` (``model.compile``), ``+ac`` (activation
checkpointing), combined as ``sft:polyfast+liger+compile``.

The precomputed and LoRA modes are not in the default list (``--modes hdpo:precomputed``,
``--modes sft:lora hdpo:lora`` or ``--lora`` to add the LoRA ones: their peak memory beside the full
fine-tuning modes' is the point). The LoRA modes' FLOPs count the trunk's backward once (the input
gradient; frozen weights get none): 2 forwards per training step; the precomputed mode has no
reference forward.

The HDPO modes start from the same random-init checkpoint (written once) and train on pairs whose
rejected side is the human response with its words reversed; distances are the text-feature band
distance (computed once, before timing). ``--data demo`` (default) uses the built-in records
(``--scale`` copies), ``--data sample`` the authors' released sample (``$POLYFAST_SAMPLE`` or
``../shared/data/polyalign_sample`` beside the checkout): ``--limit`` a seeded random subset of its
records, ``--per-bucket`` at most that many of each bucket.
The first ``--warmup`` steps are not timed (with ``+compile`` at least 3: the compiles of the first
pack lengths); ``--steps 0`` times one whole epoch of packs.

Reported: tokens/s of real tokens (no padding), step time, peak memory (CUDA: max allocated; CPU:
the process's peak resident set, which includes the Python runtime) and MFU. HDPO tokens are pair
tokens, counted the unshared way (the prompt once per side), so that the three HDPO modes divide the
same work by their times. Model FLOPs count what a mode computes: 2 x (the decoder's matmul
parameters + the head) per token and forward, plus causal attention 2 x layers x heads x head_dim x
sum(len^2) (a segment of q queries over k keys, aligned bottom-right, counts 2qk - q^2); training =
3 forwards, the frozen reference 1 forward; activation-checkpoint recompute is not counted. MFU
needs the device's dense bf16 peak (known cards, or ``--peak-tflops``); a CPU has none. With
``--mode hdpo`` the pair tokens/s of every bucket are printed for each mode, and the gain of prefix
sharing per bucket (the steps are timed one by one; a pack holds one bucket).

Each mode's row goes to bench/results/train.jsonl (--out) as soon as it is measured, a failed or
timed-out mode (--mode-timeout) with its error; a markdown table is printed, then one JSON line.
``--table JSONL`` prints a run's table from the file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

from .harness import RESULTS, append_jsonl, machine, read_runs, run_isolated
from .train_baselines import hdpo_baseline, sft_baseline
from .train_flops import flops_per_forward, group_work, peak_flops, prompt_share, step_work
from .train_render import best_rounds, render
from .train_setup import (MODELS, fit_examples, hdpo_config, hdpo_pairs, overrides, records,
                          start_checkpoint)

MODES = ["sft:polyfast", "sft:baseline", "hdpo:polyfast", "hdpo:unshared", "hdpo:baseline"]
LORA_MODES = ["sft:lora", "hdpo:lora"]
EXTRA_MODES = ["hdpo:precomputed", *LORA_MODES]


# ---------------------------------------------------------------------------------------------
# the polyfast modes: each returns (step function -> its work, model config, device, forwards per
# step counted in FLOPs: 3 for training, +1 per frozen model, info); the baselines are in
# train_baselines.py


def _lora(args) -> dict:
    return {"model.lora.r": args.lora_rank, "model.lora.alpha": 2.0 * args.lora_rank}


def sft_polyfast(args, tmp, lora: bool = False):
    from polyfast.config import SFTConfig, load_config
    from polyfast.data import bucket_weights, byte_tokenizer, encode_records
    from polyfast.train.sft import PreparedData, SFTTrainer

    tok = byte_tokenizer()
    extra = {**overrides(args), "run_dir": os.path.join(tmp, "sft"), "model.liger": args.liger,
             "model.compile": args.compile, **(_lora(args) if lora else {})}
    cfg = load_config(SFTConfig, None, [], extra=extra)
    recs = records(args)
    weights = bucket_weights(recs)
    exs = fit_examples(encode_records(tok, recs, weights=weights), args.max_tokens)
    tr = SFTTrainer(cfg, data=PreparedData(exs, [], weights, sorted(weights)), tokenizer=tok)

    def step(s):
        packs = tr.step_packs(s % tr.steps_per_epoch)
        tr.train_step(packs)
        return step_work([len(e) for p in packs for e in p])
    per_step = len(exs) / len(tr.packs(0)) * args.grad_accum
    return step, tr.model.config, tr.device, 2 if lora else 3, {
        "examples_per_step": per_step, "steps_per_epoch": tr.steps_per_epoch,
        **_trainable(tr.model)}


def _trainable(model) -> dict:
    from polyfast.lora import trainable_count
    trains, total = trainable_count(model)
    return {"trainable_params": trains, "params": total}

def hdpo_polyfast(args, tmp, shared: bool = True, lora: bool = False, precomputed: bool = False):
    from polyfast.train.hdpo import HDPOTrainer

    more = {**(_lora(args) if lora else {}),
            **({"hdpo.reference": "precomputed"} if precomputed else {})}
    cfg = hdpo_config(args, tmp, start_checkpoint(args, tmp), shared, more)
    tr = HDPOTrainer(cfg, pairs=hdpo_pairs(args))  # (a precomputed reference: before timing)

    def step(s):
        packs = tr.step_packs(s % tr.steps_per_epoch)
        tr.train_step(packs)
        return group_work([g for p in packs for g in p])
    per_step = tr.counts["kept"] / len(tr.packs(0)) * args.grad_accum
    return step, tr.model.config, tr.device, 3 if lora or precomputed else 4, {
        "pairs_per_step": per_step, "steps_per_epoch": tr.steps_per_epoch,
        "prompt_share": prompt_share(tr.examples), **_trainable(tr.model)}


RUNNERS = {"sft:polyfast": sft_polyfast, "sft:baseline": sft_baseline,
           "hdpo:polyfast": hdpo_polyfast,
           "hdpo:unshared": lambda args, tmp: hdpo_polyfast(args, tmp, shared=False),
           "hdpo:baseline": hdpo_baseline,
           "hdpo:precomputed": lambda args, tmp: hdpo_polyfast(args, tmp, precomputed=True),
           "sft:lora": lambda args, tmp: sft_polyfast(args, tmp, lora=True),
           "hdpo:lora": lambda args, tmp: hdpo_polyfast(args, tmp, lora=True)}
# a polyfast mode + options: "sft:polyfast+liger+compile" (the switch each names, for that mode)
OPTIONS = {"liger": "liger", "compile": "compile", "ac": "activation_checkpointing"}


def split_mode(mode: str) -> tuple[str, list[str]]:
    """("sft:polyfast", ["liger"]) from "sft:polyfast+liger"; an unknown mode or option, or an
    option on a baseline, is an error naming it."""
    base, *opts = mode.split("+")
    if base not in RUNNERS:
        raise ValueError(f"unknown mode {base!r} (known: {', '.join(RUNNERS)})")
    bad = [o for o in opts if o not in OPTIONS]
    if bad:
        raise ValueError(f"unknown option {bad[0]!r} in {mode!r} (known: {', '.join(OPTIONS)})")
    if opts and base.endswith(":baseline"):
        raise ValueError(f"{mode!r}: the baselines take no polyfast options")
    return base, opts


def mode_args(mode: str, args) -> argparse.Namespace:
    """``args`` with the switches ``mode``'s options name turned on."""
    _, opts = split_mode(mode)
    return argparse.Namespace(**{**vars(args), **{OPTIONS[o]: True for o in opts}})


def check_mode(text: str) -> str:
    """``text`` if it is a mode (``split_mode``), else argparse's error saying why."""
    try:
        split_mode(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def compile_warmup(args) -> int:
    """The untimed steps: ``--warmup``, and with compiled layers at least 3 (torch.compile builds
    the first pack's static shapes, recompiles at the second length, then with dynamic ones)."""
    return max(args.warmup, 3) if args.compile else args.warmup


def run_one(mode: str, args) -> dict:
    """Build ``mode``, run its warm-up and timed steps (each timed alone); one result row."""
    base, _ = split_mode(mode)
    args = mode_args(mode, args)
    with tempfile.TemporaryDirectory(prefix="polyfast-bench-train-") as tmp:
        step, config, device, forwards, info = RUNNERS[base](args, tmp)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        warmup = compile_warmup(args)
        for s in range(warmup):
            step(s)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps = args.steps or info["steps_per_epoch"]  # 0: one whole epoch
        flops, tokens, computed, dt = 0.0, 0, 0, 0.0
        per_bucket: dict[str, list[float]] = {}  # bucket -> [tokens, seconds]
        for s in range(warmup, warmup + steps):
            t0 = time.perf_counter()
            work = step(s)
            sync()
            seconds = time.perf_counter() - t0
            dt += seconds
            tokens += work["tokens"]
            computed += sum(work["lengths"])
            flops += forwards * flops_per_forward(config, work["lengths"], work["attn_sq"])
            if work["bucket"] is not None:
                acc = per_bucket.setdefault(work["bucket"], [0, 0.0, 0.0])
                acc[0] += work["tokens"]
                acc[1] += seconds
                acc[2] += forwards * flops_per_forward(config, work["lengths"], work["attn_sq"])
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
        kind, impl = mode.split(":")
        return {"mode": kind, "impl": impl, "steps": steps, "seconds": dt,
                "tokens": tokens, "computed_tokens": computed, "tokens_per_s": tokens / dt,
                "step_ms": dt / steps * 1e3, "peak_mb": peak, "flops": flops,
                "flops_per_s": flops / dt,
                "buckets": {b: {"tokens": t, "seconds": sec, "tokens_per_s": t / sec, "flops": f}
                            for b, (t, sec, f) in sorted(per_bucket.items())}, **info}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--modes", nargs="*", default=MODES, type=check_mode, metavar="MODE",
                   help=f"modes (default: {' '.join(MODES)}; also {' '.join(EXTRA_MODES)}); a "
                        "polyfast mode takes options: +liger, +compile, +ac (activation "
                        "checkpointing), e.g. sft:polyfast+liger")
    p.add_argument("--lora", action="store_true", help="add the LoRA modes (sft:lora, hdpo:lora)")
    p.add_argument("--lora-rank", type=int, default=16, help="the LoRA modes' rank")
    p.add_argument("--mode", choices=["sft", "hdpo"], help="only the modes of this kind")
    p.add_argument("--data", choices=["demo", "sample"], default="demo",
                   help="the built-in records, or the authors' released sample")
    p.add_argument("--per-bucket", type=int, default=0,
                   help="at most N records per bucket (--data sample; 0: no cap)")
    p.add_argument("--limit", type=int, default=0,
                   help="a seeded random subset of N records (--data sample; 0: all)")
    p.add_argument("--steps", type=int, default=6,
                   help="timed optimizer steps per mode (0: one epoch)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=2048, help="pack capacity (polyfast)")
    p.add_argument("--grad-accum", type=int, default=1, help="packs per optimizer step")
    p.add_argument("--scale", type=int, default=1, help="copies of the demo data")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="model.dtype of the polyfast modes (bfloat16: the least memory)")
    p.add_argument("--liger", action="store_true", help="model.liger for the polyfast modes")
    p.add_argument("--compile", action="store_true", help="model.compile for the polyfast modes")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--out", default=os.path.join(RESULTS, "train.jsonl"),
                   help="JSONL file the rows are appended to (default bench/results/train.jsonl)")
    p.add_argument("--mode-timeout", type=float, default=3600, help="seconds per mode")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds over the modes; the table keeps each mode's fastest")
    p.add_argument("--table", metavar="JSONL", help="print the table of the last run in JSONL and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = p.parse_args(argv)
    if args.lora:
        args.modes = [*args.modes, *(m for m in LORA_MODES if m not in args.modes)]
    if args.mode:
        args.modes = [m for m in args.modes if m.startswith(args.mode + ":")]
    return p, args

def main(argv=None) -> int:
    _, args = parse_args(argv)
    if args.table:
        print(render(read_runs(args.table, "train")))
        return 0
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return 0
    info = machine()
    peak = peak_flops(info["device"], args.peak_tflops)
    passthrough = list(argv if argv is not None else sys.argv[1:])
    rows = []
    # --repeat: the modes in turn, round after round, so that a slow spell of a shared machine
    # hits every mode alike; the table keeps each mode's fastest round
    for attempt, mode in ((a, m) for a in range(args.repeat) for m in args.modes):
        r = run_isolated("polyfast.bench.train", ["--one", mode, *passthrough],
                         timeout=args.mode_timeout)
        kind, impl = mode.split(":")
        row = {"bench": "train", "model": args.model, "max_tokens": args.max_tokens,
               "attempt": attempt,
               "data": args.data, "per_bucket": args.per_bucket if args.data == "sample" else None,
               "limit": args.limit if args.data == "sample" else None,
               "grad_accum": args.grad_accum, "dtype": args.dtype,
               **{k: getattr(mode_args(mode, args), k) for k in OPTIONS.values()},
               **info, "mode": kind, "impl": impl, **r}
        if "error" in r:
            print(f"  {mode}: failed: {r['error']}", file=sys.stderr)
        else:
            row["mfu"] = r["flops_per_s"] / peak if peak else None
            print(f"  {mode}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_ms']:,.0f} ms/step, "
                  f"{r['peak_mb']:,.0f} MB" + (f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else ""),
                  file=sys.stderr)
        append_jsonl(args.out, [row])  # row by row: a run cut short keeps what it measured
        rows.append(row)
    print("\n" + render(rows))
    ok = [r for r in best_rounds(rows) if "error" not in r]
    print(json.dumps({"bench": "train", "machine": info, "model": args.model,
                      "tokens_per_s": {f"{r['mode']}:{r['impl']}": r["tokens_per_s"] for r in ok},
                      "mfu": {f"{r['mode']}:{r['impl']}": r["mfu"] for r in ok}}))
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
