"""``polyfast <command> ...``: the command line.

    demo       the whole pipeline on the built-in data (CPU)
    sft        Bucket-Aware SFT from a YAML config
    generate   batched generation from an exported model
    pairs      preference pairs: human (chosen) against a prediction (rejected)
    critic     critic references, training and scoring
    hdpo       HDPO from a Bucket-SFT checkpoint and a pairs file
    eval       per-bucket metrics, report.md and plots; --compare runs side by side
    config     every config key with its meaning (config show sft|hdpo)
    data       data tools (data stats)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import defaultdict

from .errors import Interrupted, PolyfastError


def _file_and_overrides(path: str | None, overrides) -> tuple[str | None, list[str]]:
    """A CONFIG argument that is a ``key=value`` (and no file of that name) is the first
    override of the defaults."""
    if path is not None and "=" in path and not os.path.exists(path):
        return None, [path, *overrides]
    return path, list(overrides)


def _overrides(args) -> list[str]:
    return list(args.overrides) + (["train.overwrite=true"] if args.overwrite else [])


def note_demo_inputs(cfg) -> None:
    """Say so when a config trains on the demo's inputs (the built-in records, or files a demo
    run wrote under runs/demo), which a copied demo config does unless its paths are changed."""
    from .config import flatten, to_dict

    keys = ("data.train", "data.val", "data.pairs", "data.val_pairs", "model.path")
    demo = {k: v for k, v in flatten(to_dict(cfg)).items() if k in keys and isinstance(v, str)
            and (v == "demo" or v.replace("\\", "/").startswith("runs/demo/"))}
    if demo:
        print("note: this config uses the demo's inputs: "
              + ", ".join(f"{k}={v}" for k, v in demo.items())
              + f" (override them, e.g. {next(iter(demo))}=PATH, for your own)", file=sys.stderr)


def _train(args, kind: str) -> int:
    """``polyfast sft`` / ``polyfast hdpo``: the config (checked before torch is imported, so that
    typos fail fast), the run directory's lock, the trainer, its run and a summary."""
    from .config import HDPOConfig, SFTConfig, load_config

    path, overrides = _file_and_overrides(args.config, _overrides(args))
    cfg = load_config(SFTConfig if kind == "sft" else HDPOConfig, path, overrides)
    from .train.rundir import check_unlocked

    check_unlocked(cfg.run_dir)  # refuse before loading data and model, not after
    if kind == "sft":
        from .train.sft import SFTTrainer as trainer_class
    else:
        from .train.hdpo import HDPOTrainer as trainer_class
    trainer = trainer_class(cfg)
    note_demo_inputs(cfg)
    result = trainer.fit()
    if trainer.dist.main:  # under torchrun, one summary
        (_print_sft if kind == "sft" else _print_hdpo)(result)
    return 0


def _steps(s: dict) -> str:
    """'120 steps' or, for a resumed run, '70 steps (51-120, resumed from step 50)'."""
    if s.get("resumed_from_step") is None:
        return f"{s['steps']} steps"
    return (f"{s['steps_run']} steps ({s['resumed_from_step'] + 1}-{s['steps']}, resumed from step "
            f"{s['resumed_from_step']})")


def _print_sft(result: dict) -> None:
    from .train.sft import eval_table

    s = result["summary"]
    print()
    if result["eval_after"]:
        print("Eval loss per bucket (mean token CE per example, averaged within the bucket):")
        print(eval_table(result["eval_before"], result["eval_after"]))
    print(f"\n{_steps(s)} in {s['train_seconds']:.1f}s, {s['tokens_per_s']:,.0f} tokens/s, "
          f"packing efficiency {s['packing_efficiency']:.3f}; model exported to {s['export']}")


def _cmd_demo(args) -> int:
    from .pipeline import run_demo

    run_demo(args.out or "runs/demo", args.overrides, progress=not args.no_progress,
             overwrite=args.overwrite)
    return 0


def _print_hdpo(result: dict) -> None:
    s = result["summary"]
    if result["eval_after"] and result["eval_before"]:
        b, a = result["eval_before"], result["eval_after"]
        print(f"held-out pairs: reward accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}, "
              f"margin {b['margin']:.3f} -> {a['margin']:.3f}")
    print(f"{_steps(s)} in {s['train_seconds']:.1f}s, {s['tokens_per_s']:,.0f} tokens/s; "
          f"model exported to {s['export']}")


def _records_arg(path: str, args=None):
    """A data file, or demo[:split] for the built-in records (default split: train)."""
    from .data import demo_records, load_records

    if path == "demo" or path.startswith("demo:"):
        return demo_records(path.split(":", 1)[1] if ":" in path else "train")
    return load_records(path, skip_bad_rows=getattr(args, "skip_bad_rows", False),
                        legacy_tokens=getattr(args, "legacy_tokens", False))


def _cmd_generate(args) -> int:
    from .eval.generate import GenerationConfig, generate, load_for_generation, save_predictions
    from .model import resolve_device

    records = _records_arg(args.data, args)[: args.limit or None]
    model, tok = load_for_generation(args.model, resolve_device(args.device))
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                           temperature=args.temperature, top_p=args.top_p,
                           batch_size=args.batch_size, system=args.system, seed=args.seed,
                           num_samples=args.num_samples, profile=SYSTEM_PROFILE[args.system])
    rows = generate(model, tok, records, cfg)
    save_predictions(rows, args.out)
    each = f" ({args.num_samples} samples each)" if args.num_samples > 1 else ""
    note = _truncation_note(rows)
    print(f"{len(rows)} predictions{each} -> {args.out}" + (f"; {note}" if note else ""))
    return 0


# the evaluation profile a generation's system prompt amounts to (the record's gold length bin
# is what `--system profile` puts in the prompt: the oracle profile)
SYSTEM_PROFILE = {"profile": "oracle", "record": "record", "none": "none"}


def _truncation_note(rows) -> str:
    """How many prompts generation cut to fit the model's context ("" when none)."""
    cut = [r["prompt_truncated"] for r in rows if r.get("prompt_truncated")]
    return (f"{len(cut)} prompts longer than the model's context (less --max-new-tokens) were "
            f"cut from the left, {sum(cut)} tokens in all" if cut else "")


def _cmd_pairs(args) -> int:
    import dataclasses

    from .critic import References, text_distance
    from .data import make_pairs, pair_weights, save_pairs
    from .data.pairs import describe_counts
    from .eval.generate import load_samples

    records = _records_arg(args.records, args)
    if args.num_samples < 0:
        from .errors import ConfigError
        raise ConfigError("--num-samples", f"must be >= 1, got {args.num_samples}")
    samples = load_samples(args.predictions)
    if args.num_samples:  # the first K samples of each record
        samples = {k: v[:args.num_samples] for k, v in samples.items()}
    pairs, counts = make_pairs(records, samples, pair_type=args.pair_type)
    if not pairs:
        from .errors import DataError
        raise DataError(f"no pair kept ({describe_counts(counts)})", args.predictions)
    if args.references:
        refs = References.load(args.references)
        buckets = [p.bucket_id for p in pairs]
        dc = text_distance(refs, [p.chosen for p in pairs], buckets)
        dr = text_distance(refs, [p.rejected for p in pairs], buckets)
        pairs = [dataclasses.replace(p, chosen_dist=float(c), rejected_dist=float(r))
                 for p, c, r in zip(pairs, dc, dr)]
    pairs = pair_weights(pairs)
    save_pairs(pairs, args.out)
    print(f"{len(pairs)} pairs -> {args.out}; {describe_counts(counts)}")
    return 0


def _cmd_critic(args) -> int:
    import json

    import numpy as np

    from .critic import FEATURE_NAMES, MLPCritic, References, features, train_mlp_critic
    from .data import load_pairs

    model = tok = None
    if getattr(args, "model", None):  # a scoring LM: its log-prob statistics join the features
        from .eval.generate import load_for_generation
        model, tok = load_for_generation(args.model)
    if args.critic_command == "references":
        records = _records_arg(args.data, args)
        values, names = features(records, model=model, tokenizer=tok)
        refs = References.build(records, values, names, args.min_bucket_size, args.band_floor)
        refs.save(args.out)
        print(f"references of {len(refs.features)} features over {len(records)} records "
              f"({len(refs.stats)} keys) -> {args.out}")
    elif args.critic_command == "train":
        records = _records_arg(args.data, args)
        critic, history = train_mlp_critic(records, load_pairs(args.pairs),
                                           References.load(args.references), epochs=args.epochs)
        critic.save(args.out)
        print(f"critic -> {args.out}; loss per epoch: " + ", ".join(f"{h:.4f}" for h in history))
    else:  # score
        if args.pairs:
            pairs = load_pairs(args.pairs)
            records = [p.record for p in pairs for _ in (0, 1)]
            texts = [t for p in pairs for t in (p.chosen, p.rejected)]
            ids = [f"{p.id}:{side}" for p in pairs for side in ("chosen", "rejected")]
        else:
            records = _records_arg(args.data, args)
            texts, ids = [r.response for r in records], [r.id for r in records]
        buckets = [r.bucket_id for r in records]
        if args.critic:
            scores = MLPCritic.load(args.critic).score(texts, buckets)
        else:
            refs = References.load(args.references)
            if len(refs.features) > len(FEATURE_NAMES) and model is None:
                from .errors import ConfigError
                raise ConfigError("--model", f"{args.references} holds LM features: give the "
                                  "scoring model they were computed with")
            values, _ = features(records, texts, model=model, tokenizer=tok)
            scores = refs.distance(values, buckets)
        with open(args.out, "w", encoding="utf-8") as f:
            for i, b, s in zip(ids, buckets, scores):
                f.write(json.dumps({"id": i, "bucket_id": b, "score": float(s)}) + "\n")
        print(f"{len(scores)} scores (mean {np.mean(scores):.4f}) -> {args.out}")
    return 0


def _cmd_eval(args) -> int:
    from .eval.evaluate import align, compare, evaluate, prior_records, write_report

    if args.compare:
        print(compare(args.compare, args.out or "eval_compare"))
        return 0
    if not args.data or not args.references or not (args.model or args.predictions):
        from .errors import ConfigError
        raise ConfigError("eval", "give --model or --predictions, --data TEST and --references TRAIN "
                          "(or --compare DIR ...)")
    test = _records_arg(args.data, args)
    train = _records_arg(args.references, args)
    if args.limit:
        from .eval.evaluate import stratified_subset
        full = len(test)
        test = stratified_subset(test, args.limit, args.seed)
        print(f"evaluating {len(test)} of {full} test records (--limit {args.limit}: a seeded "
              "subset, every bucket in proportion)")
    out = args.out or "eval"
    if args.model:
        from .eval.generate import GenerationConfig, generate, load_for_generation, save_predictions
        profile = args.profile or "prior"
        model, tok = load_for_generation(args.model)
        prompts = prior_records(test, train, args.seed) if profile == "prior" else test
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               system="none" if profile == "none" else "profile", profile=profile)
        rows = generate(model, tok, prompts, cfg)
        os.makedirs(out, exist_ok=True)
        save_predictions(rows, os.path.join(out, "predictions.jsonl"))
        note = _truncation_note(rows)
        if note:
            print(note)
        preds = [r["prediction"] for r in rows]
        title = args.title or os.path.basename(os.path.normpath(args.model))
    else:
        from .eval.generate import load_predictions, predictions_profile
        stored = predictions_profile(args.predictions)
        if stored and args.profile and stored != args.profile:
            from .errors import ConfigError
            raise ConfigError("--profile", f"{args.predictions} was generated with the {stored!r} "
                              f"profile, not {args.profile!r}")
        profile = stored or args.profile or "unknown"
        preds = align(test, load_predictions(args.predictions), args.predictions,
                      subset=bool(args.limit))
        title = args.title or os.path.basename(args.predictions)
    featurizer = None
    if args.featurizer:
        from .eval.evaluate import mauve_available
        if mauve_available():
            from .eval.generate import load_for_generation
            featurizer = load_for_generation(args.featurizer, key="--featurizer")
        else:
            print("C-MAUVE skipped: mauve-text is not installed (pip install polyfast[mauve])")
    else:
        print("C-MAUVE skipped: no --featurizer model given")
    result = evaluate(test, preds, train, seed=args.seed, featurizer=featurizer,
                      band_floor=args.band_floor)
    write_report(result, out, title, profile)
    m = result["macro"]
    print(f"{title} ({profile}): " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
          + f"\nreport -> {os.path.join(out, 'report.md')}")
    return 0


def _cmd_data_stats(args) -> int:
    from .data import bucket_weights, demo_records, read_records, token_count
    from .tables import format_table

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


def _cmd_config(args) -> int:
    from .config import CONFIGS, load_config, show_config

    path, overrides = _file_and_overrides(args.file, args.overrides)
    print(show_config(CONFIGS[args.kind], load_config(CONFIGS[args.kind], path, overrides)), end="")
    return 0


BAND_FLOOR_HELP = ("the band distance's scale floor: a feature's spread over the language's human "
                   "responses (language), or 1e-6 as the authors' code (authors)")
OVERWRITE_HELP = ("replace a run already in run_dir (its checkpoints, export and log); "
                  "same as train.overwrite=true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="polyfast", description="Fast PolyAlign training.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    sft = sub.add_parser("sft", help="Bucket-Aware SFT from a YAML config")
    sft.add_argument("config", nargs="?", default=None,
                     help="a YAML config; without it, the defaults (config show sft)")
    sft.add_argument("overrides", nargs="*", help="key.path=value")
    sft.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    sft.set_defaults(func=lambda args: _train(args, "sft"))

    hdpo = sub.add_parser("hdpo", help="HDPO from a Bucket-SFT checkpoint and a pairs file")
    hdpo.add_argument("config", nargs="?", default=None,
                      help="a YAML config; without it, the defaults (config show hdpo)")
    hdpo.add_argument("overrides", nargs="*", help="key.path=value")
    hdpo.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    hdpo.set_defaults(func=lambda args: _train(args, "hdpo"))

    demo = sub.add_parser("demo", help="the whole pipeline on the built-in demo data (CPU)")
    demo.add_argument("--out", default=None, help="output directory (default runs/demo)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the runs of an earlier demo in the output directory")
    demo.add_argument("overrides", nargs="*", help="key.path=value for the SFT stage")
    demo.set_defaults(func=_cmd_demo)

    gen = sub.add_parser("generate", help="batched generation from an exported model")
    gen.add_argument("--model", required=True, help="a run directory or its final/ export")
    gen.add_argument("--data", required=True, help="records file, or demo[:split]")
    gen.add_argument("--out", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument("--system", choices=["profile", "record", "none"], default="profile",
                     help="the profile system prompt, the record's own, or none")
    gen.add_argument("--limit", type=int, default=0, help="only the first N records")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-samples", type=int, default=1, metavar="K",
                     help="K sampled responses per prompt (with --sample): K pairs per record, "
                          "sharing the prompt in HDPO")
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=_cmd_generate)

    pairs = sub.add_parser("pairs", help="preference pairs: human (chosen) vs prediction (rejected)")
    pairs.add_argument("--records", required=True, help="records file, or demo[:split]")
    pairs.add_argument("--predictions", required=True)
    pairs.add_argument("--out", required=True)
    pairs.add_argument("--references", default=None, help="critic references: adds distances")
    pairs.add_argument("--pair-type", choices=["global", "distribution", "local"],
                       default="distribution")
    pairs.add_argument("--num-samples", type=int, default=0, metavar="K",
                       help="pairs per record from its first K samples (default: every sample "
                            "in the predictions file)")
    pairs.set_defaults(func=_cmd_pairs)

    critic = sub.add_parser("critic", help="critic references, training and scoring")
    csub = critic.add_subparsers(dest="critic_command", required=True)
    ref = csub.add_parser("references", help="per-bucket feature bands from TRAIN records")
    ref.add_argument("--data", required=True, help="TRAIN records, or demo[:train]")
    ref.add_argument("--out", required=True)
    ref.add_argument("--min-bucket-size", type=int, default=20)
    ref.add_argument("--model", default=None, help="a scoring LM (run dir): adds LM features")
    ref.add_argument("--band-floor", choices=["language", "authors"], default="language",
                     help=BAND_FLOOR_HELP)
    ctrain = csub.add_parser("train", help="train the MLP critic")
    ctrain.add_argument("--data", required=True, help="TRAIN records")
    ctrain.add_argument("--pairs", required=True)
    ctrain.add_argument("--references", required=True)
    ctrain.add_argument("--out", required=True, help="output directory (safetensors + JSON)")
    ctrain.add_argument("--epochs", type=int, default=3)
    score = csub.add_parser("score", help="score responses: band distance or the MLP critic")
    score.add_argument("--data", default=None)
    score.add_argument("--pairs", default=None)
    score.add_argument("--references", default=None)
    score.add_argument("--critic", default=None, help="an MLP critic directory")
    score.add_argument("--model", default=None, help="the scoring LM of LM-feature references")
    score.add_argument("--out", required=True)
    critic.set_defaults(func=_cmd_critic)

    ev = sub.add_parser("eval", help="per-bucket metrics, report.md and plots")
    ev.add_argument("--model", default=None, help="a run to generate with first")
    ev.add_argument("--predictions", default=None, help="a predictions JSONL (id, prediction)")
    ev.add_argument("--data", default=None, help="TEST records, or demo:test")
    ev.add_argument("--references", default=None,
                    help="TRAIN records (or demo:train): the human support for BNG, HCR, distance")
    ev.add_argument("--profile", choices=["oracle", "prior", "none"], default=None,
                    help="length bin in the profile prompt: gold (oracle), drawn from the TRAIN "
                         "prior of the record's language|track|family (default with --model), "
                         "or no profile prompt; with --predictions, the one stored in the file")
    ev.add_argument("--limit", type=int, default=0, metavar="N",
                    help="evaluate a seeded subset of N test records, every bucket in proportion")
    ev.add_argument("--band-floor", choices=["language", "authors"], default="language",
                    help=BAND_FLOOR_HELP)
    ev.add_argument("--compare", nargs="+", default=None, help="eval dirs to put side by side")
    ev.add_argument("--featurizer", default=None, help="a local LM for C-MAUVE (needs mauve-text)")
    ev.add_argument("--out", default=None)
    ev.add_argument("--title", default=None)
    ev.add_argument("--max-new-tokens", type=int, default=384)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=_cmd_eval)

    conf = sub.add_parser("config", help="show a config with every key and its meaning")
    csub2 = conf.add_subparsers(dest="config_command", required=True)
    show = csub2.add_parser("show", help="the defaults of sft or hdpo as commented YAML; with "
                                         "FILE, that config as loaded (overrides applied)")
    show.add_argument("kind", choices=["sft", "hdpo"])
    show.add_argument("file", nargs="?", default=None, help="a config file to show as loaded")
    show.add_argument("overrides", nargs="*", help="key.path=value")
    show.set_defaults(func=_cmd_config)

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


def _resume_command(argv: list[str]) -> str:
    """The command line that resumes an interrupted training command."""
    import shlex
    args = [a for a in argv if a not in ("--overwrite", "train.overwrite=true",
                                         "train.resume=true")]
    return "polyfast " + " ".join(shlex.quote(a) for a in args + ["train.resume=true"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("\npolyfast: interrupted", file=sys.stderr)
        return 130
    except Interrupted as e:
        resume = (f"; resume with: {_resume_command(argv)}"
                  if e.checkpoint and args.command in ("sft", "hdpo") else "")
        print(f"\npolyfast: {e}{resume}", file=sys.stderr)
        return 130
    except PolyfastError as e:
        print(f"polyfast: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command was pointed at: say which, without a traceback
        if e.filename is None:
            raise
        where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        print(f"polyfast: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
