"""``polyfast <command> ...``: sft, demo, data stats."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import defaultdict

from .errors import PolyfastError

# The built-in demo run (configs/demo_sft.yaml holds the same settings; a test keeps them equal).
DEMO_SFT = {
    "run_dir": "runs/demo/sft",
    "seed": 0,
    "model": {"tiny": {"arch": "llama", "hidden_size": 128, "num_layers": 2, "num_heads": 4,
                       "num_kv_heads": 2, "intermediate_size": 352,
                       "max_position_embeddings": 4096, "tie_word_embeddings": True}},
    "data": {"train": "demo", "val": "demo", "max_tokens": 2048, "packing": "bucket",
             "weighting": "bucket"},
    "train": {"epochs": 2, "lr": 3e-3, "warmup_ratio": 0.05, "min_lr_ratio": 0.1,
              "grad_accum": 1, "grad_clip": 1.0, "num_threads": None, "log_every": 5},
}


def _cmd_sft(args) -> int:
    from .config import SFTConfig, load_config
    from .train.sft import SFTTrainer, eval_table

    cfg = load_config(SFTConfig, args.config, args.overrides)
    result = SFTTrainer(cfg).fit()
    _print_result(result)
    return 0


def _print_result(result: dict) -> None:
    from .train.sft import eval_table

    s = result["summary"]
    print()
    if result["eval_after"]:
        print("Eval loss per bucket (mean token CE per example, averaged within the bucket):")
        print(eval_table(result["eval_before"], result["eval_after"]))
    print(f"\n{s['steps']} steps in {s['train_seconds']:.1f}s, {s['tokens_per_s']:,.0f} tokens/s, "
          f"packing efficiency {s['packing_efficiency']:.3f}; model exported to {s['export']}")


def _cmd_demo(args) -> int:
    from .config import SFTConfig, load_config
    from .train.sft import SFTTrainer

    out = args.out or "runs/demo"
    cfg = load_config(SFTConfig, None, args.overrides,
                      extra={**_flatten(DEMO_SFT), "run_dir": os.path.join(out, "sft")})
    t0 = time.perf_counter()
    print(f"polyfast demo: Bucket-Aware SFT of a tiny {cfg.model.tiny.arch} model on the built-in "
          f"bilingual demo data -> {cfg.run_dir}")
    result = SFTTrainer(cfg).fit()
    _print_result(result)
    print(f"demo finished in {time.perf_counter() - t0:.1f}s")
    return 0


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _cmd_data_stats(args) -> int:
    from .data import bucket_weights, demo_records, read_records, token_count
    from .train.metrics import format_table

    if args.path == "demo":
        records, report = demo_records(args.split or "train"), None
    else:
        records, report = read_records(args.path, skip_bad_rows=args.skip_bad_rows,
                                       legacy_tokens=args.legacy_tokens)
    weights = bucket_weights(records, power=args.power, clip=args.clip)
    lengths = defaultdict(list)
    for r in records:
        lengths[r.bucket_id].append(token_count(r.response, legacy=args.legacy_tokens))
    rows = []
    for b in sorted(lengths):
        ls = sorted(lengths[b])
        rows.append([b, len(ls), weights[b], min(ls), ls[len(ls) // 2], max(ls),
                     sum(ls) / len(ls)])
    print(format_table(["bucket", "records", "weight", "min tok", "median tok", "max tok",
                        "mean tok"], rows))
    print(f"\n{len(records)} records in {len(lengths)} buckets"
          + (f"; {report.summary()}" if report else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polyfast", description="Fast PolyAlign training.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    sft = sub.add_parser("sft", help="Bucket-Aware SFT from a YAML config")
    sft.add_argument("config")
    sft.add_argument("overrides", nargs="*", help="key.path=value")
    sft.set_defaults(func=_cmd_sft)

    demo = sub.add_parser("demo", help="the whole pipeline on the built-in demo data (CPU)")
    demo.add_argument("--out", default=None, help="output directory (default runs/demo)")
    demo.add_argument("overrides", nargs="*", help="key.path=value for the SFT stage")
    demo.set_defaults(func=_cmd_demo)

    data = sub.add_parser("data", help="data tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    stats = dsub.add_parser("stats", help="per-bucket counts, weights and token lengths")
    stats.add_argument("path", help="a data file, or 'demo'")
    stats.add_argument("--split", default=None, help="demo split (train/val/test/all)")
    stats.add_argument("--legacy-tokens", action="store_true", help="the authors' token regex")
    stats.add_argument("--skip-bad-rows", action="store_true")
    stats.add_argument("--power", type=float, default=1.0, help="bucket weight power")
    stats.add_argument("--clip", type=float, default=None, help="bucket weight cap")
    stats.set_defaults(func=_cmd_data_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except PolyfastError as e:
        print(f"polyfast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
