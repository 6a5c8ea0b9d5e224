"""End-to-end Bucket-SFT training throughput: packed (bucket / mixed) against the padded baseline.

    python -m bench.train                    # the demo model and data, on this machine
    python -m bench.train --steps 40 --packings bucket none

Each mode trains the same model from the same init on the same demo data; the first ``--warmup``
steps are not timed. tokens/s counts real tokens (no padding); efficiency = real tokens / token slots over an epoch
(packs of max_tokens slots; padded rows of the batch's longest example).
Rows go to bench/results/train.jsonl; a markdown table is printed, ratios against ``none``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench.harness import append_jsonl, machine, markdown_table


def run_mode(packing: str, steps: int, warmup: int, batch_size: int, max_tokens: int) -> dict:
    from polyfast.cli import DEMO_SFT, _flatten
    from polyfast.config import SFTConfig, load_config
    from polyfast.data import packing_efficiency
    from polyfast.train.sft import SFTTrainer

    cfg = load_config(SFTConfig, None, [f"data.packing={packing}", f"data.batch_size={batch_size}",
                                        f"data.max_tokens={max_tokens}", "train.progress=false",
                                        "run_dir=/tmp/polyfast-bench-train"],
                      extra=_flatten(DEMO_SFT))
    tr = SFTTrainer(cfg)
    for s in range(warmup):
        tr.train_step(tr.step_packs(s))
    tokens = 0
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        out = tr.train_step(tr.step_packs(s % tr.steps_per_epoch))
        tokens += out["tokens"]
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"packing": packing, "steps": steps, "seconds": dt, "tokens": tokens,
            "tokens_per_s": tokens / dt,
            "efficiency": packing_efficiency(tr._packs(0), max_tokens, packing), "batch_size": batch_size,
            "max_tokens": max_tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--packings", nargs="*", default=["bucket", "mixed", "none"])
    p.add_argument("--steps", type=int, default=30, help="timed steps of the packed modes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="examples per padded batch (none)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--out", default="bench/results/train.jsonl")
    args = p.parse_args(argv)
    info = machine()
    rows = []
    for packing in args.packings:
        # the padded baseline sees about as many tokens as the packed modes: scale its step count
        steps = args.steps if packing != "none" else args.steps * 3
        r = run_mode(packing, steps, args.warmup, args.batch_size, args.max_tokens)
        rows.append({"bench": "train_sft", **info, **r})
        print(f"  {packing}: {r}", file=sys.stderr)
    append_jsonl(args.out, rows)
    base = next((r["tokens_per_s"] for r in rows if r["packing"] == "none"), None)
    table = [[r["packing"], r["steps"], r["tokens"], r["tokens_per_s"], r["efficiency"],
              r["tokens_per_s"] / base if base else None] for r in rows]
    print(f"\nBucket-SFT on the demo (tiny llama), {info['device']}, torch {info['torch']}, {info['date']}\n")
    print(markdown_table(["packing", "steps", "real tokens", "tokens/s", "efficiency", "vs none"], table))
    print(json.dumps({"bench": "train_sft", "machine": info,
                      "tokens_per_s": {r["packing"]: r["tokens_per_s"] for r in rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
