"""The whole PolyAlign pipeline on the built-in demo: data -> Bucket-SFT -> generate on train
prompts -> pairs -> critic references -> HDPO -> a per-bucket comparison of SFT and HDPO and the
evaluation report (report.md, metrics.json, plots) with oracle and prior length profiles."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import defaultdict

import numpy as np

from .critic import text_distance, text_references
from .data import demo_records, make_pairs, pair_weights, save_pairs
from .data.tokenize import encode_records, fit_length
from .eval.generate import GenerationConfig, generate, load_for_generation, save_predictions
from .tables import format_table

# The built-in demo's SFT run (configs/demo_sft.yaml holds the same settings; a test keeps them equal).
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

# The demo's HDPO settings (a tiny model learns little at the paper's lr of 5e-7 in one epoch).
DEMO_HDPO = {"hdpo.beta": 0.1, "hdpo.reg_lambda": 0.1, "hdpo.ftx": 0.05, "hdpo.distance": "pairs",
             "hdpo.min_bucket_size": 20, "data.max_tokens": 4096, "train.lr": 1e-4,
             "train.epochs": 1, "train.warmup_ratio": 0.1, "train.log_every": 5}


def stratified(records, per_bucket: int):
    """Up to ``per_bucket`` records of every bucket, in data order."""
    seen = defaultdict(int)
    out = []
    for r in records:
        if seen[r.bucket_id] < per_bucket:
            seen[r.bucket_id] += 1
            out.append(r)
    return out


def run_demo(out: str, sft_overrides: list[str] = (), progress: bool = True, *,
             per_bucket: int = 12, max_new_tokens: int = 384, hdpo_overrides: list[str] = (),
             overwrite: bool = False) -> dict:
    """Run the pipeline into ``out``; the keyword knobs shrink it (tests use them). A directory
    holding an earlier demo's runs is refused unless ``overwrite``."""
    from .config import HDPOConfig, SFTConfig, flatten, load_config
    from .train.hdpo import HDPOTrainer
    from .train.sft import SFTTrainer, eval_table, per_bucket_loss

    t0 = time.perf_counter()
    timings = {}
    say = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731

    # 1. Bucket-Aware SFT
    cfg = load_config(SFTConfig, None, list(sft_overrides),
                      extra={**flatten(DEMO_SFT), "run_dir": os.path.join(out, "sft"),
                             "train.progress": progress, "train.overwrite": overwrite})
    say(f"1/7 Bucket-Aware SFT of a tiny {cfg.model.tiny.arch} model -> {cfg.run_dir}")
    sft = SFTTrainer(cfg)
    sft_result = sft.fit()
    timings["sft"] = time.perf_counter() - t0
    sft_dir = sft_result["summary"]["export"]

    # 2. generate on TRAIN prompts with the SFT model: the rejected side of the pairs
    train = demo_records("train")
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=32)
    model, tok = load_for_generation(sft_dir)
    prompts = stratified(train, per_bucket)
    say(f"2/7 generating {len(prompts)} train answers with the SFT model")
    rows = generate(model, tok, prompts, gen_cfg, progress=progress)
    save_predictions(rows, os.path.join(out, "train_predictions.jsonl"))

    # 3. pairs, critic references (TRAIN only), distances and pair weights
    say("3/7 pairs and critic references")
    refs = text_references(train)
    refs.save(os.path.join(out, "references.json"))
    pairs, counts = make_pairs(prompts, {r["id"]: r["prediction"] for r in rows})
    buckets = [p.bucket_id for p in pairs]
    dc = text_distance(refs, [p.chosen for p in pairs], buckets)
    dr = text_distance(refs, [p.rejected for p in pairs], buckets)
    pairs = [dataclasses.replace(p, chosen_dist=float(c), rejected_dist=float(r))
             for p, c, r in zip(pairs, dc, dr)]
    pairs = pair_weights(pairs)
    save_pairs(pairs, os.path.join(out, "pairs.jsonl"))
    say(f"    {dict(counts)}; mean distance chosen {dc.mean():.3f}, rejected {dr.mean():.3f}")

    # 4. HDPO from the SFT checkpoint
    hcfg = load_config(HDPOConfig, None, list(hdpo_overrides), extra={**DEMO_HDPO, "model.path": sft_dir,
                                                    "data.pairs": os.path.join(out, "pairs.jsonl"),
                                                    "run_dir": os.path.join(out, "hdpo"),
                                                    "train.progress": progress,
                                                    "train.overwrite": overwrite})
    held_out = pairs[::7]  # reward accuracy and margin are measured on pairs HDPO never saw
    fit_pairs = [p for i, p in enumerate(pairs) if i % 7]
    say(f"4/7 HDPO on {len(fit_pairs)} pairs ({len(held_out)} held out) -> {hcfg.run_dir}")
    hdpo = HDPOTrainer(hcfg, pairs=fit_pairs, val_pairs=held_out)
    hdpo_result = hdpo.fit()
    timings["hdpo_tokens_per_s"] = hdpo_result["summary"]["tokens_per_s"]
    hdpo_dir = hdpo_result["summary"]["export"]

    # 5. evaluate both on held-out prompts: eval loss, distance to human support, length bins
    test = demo_records("test")
    say(f"5/7 evaluating SFT and HDPO on {len(test)} test prompts")
    report = {}
    examples = [e for e in (fit_length(x, 4096) for x in encode_records(tok, test)) if e]
    names = sorted({r.bucket_id for r in test})
    for name, path in (("sft", sft_dir), ("hdpo", hdpo_dir)):
        m, _ = load_for_generation(path)
        from .model import set_packed
        set_packed(m, True)
        loss = per_bucket_loss(m, examples, names, 4096)
        gen = generate(m, tok, test, dataclasses.replace(gen_cfg, profile="oracle"),
                       progress=progress)
        save_predictions(gen, os.path.join(out, f"test_predictions_{name}.jsonl"))
        report[name] = {"loss": loss, "oracle_rows": gen}

    # 6. the evaluation report: SFT and HDPO, with the gold length bin in the profile (oracle, as
    # the authors evaluated) and with a bin drawn from the TRAIN prior (what a deployed model knows)
    say("6/7 evaluation report (oracle and prior profiles)")
    from .eval.evaluate import evaluate, prior_records, write_report
    from .eval.report import comparisons, plot_bng_hcr, report_markdown
    prior = prior_records(test, train, seed=0)
    evals = []
    for name, path in (("sft", sft_dir), ("hdpo", hdpo_dir)):
        m, _ = load_for_generation(path)
        for profile in ("oracle", "prior"):
            if profile == "oracle":
                preds = [r["prediction"] for r in report[name]["oracle_rows"]]
            else:
                preds = [r["prediction"] for r in generate(m, tok, prior, gen_cfg, progress=progress)]
            res = evaluate(test, preds, train)
            write_report(res, os.path.join(out, "eval", f"{name}_{profile}"), name.upper(), profile)
            evals.append({**res, "title": name.upper(), "profile": profile})
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({"runs": evals}, f, ensure_ascii=False, indent=1)
    plot_bng_hcr(evals, os.path.join(out, "bng_hcr.png"))
    import shutil
    for e in evals:
        if e["profile"] == "prior":
            shutil.copy(os.path.join(out, "eval", f"{e['title'].lower()}_prior", "lengths.png"),
                        os.path.join(out, f"lengths_{e['title'].lower()}.png"))

    # 7. the table
    rows_out = []
    oracle = {e["title"].lower(): e["buckets"] for e in evals if e["profile"] == "oracle"}
    for b in names:
        s, h = oracle["sft"][b], oracle["hdpo"][b]
        rows_out.append([b, report["sft"]["loss"]["buckets"][b], report["hdpo"]["loss"]["buckets"][b],
                         s["distance"], h["distance"], s["bin_agreement"], h["bin_agreement"]])
    macro = [float(np.mean([r[i] for r in rows_out])) for i in range(1, 7)]
    rows_out.append(["macro"] + macro)
    table = format_table(["bucket", "loss SFT", "loss HDPO", "dist SFT", "dist HDPO",
                          "bin SFT", "bin HDPO"], rows_out)
    before, after = hdpo_result["eval_before"], hdpo_result["eval_after"]
    held = (f"HDPO on {len(held_out)} held-out pairs: reward accuracy {before['accuracy']:.2f} -> "
            f"{after['accuracy']:.2f}, margin {before['margin']:.3f} -> {after['margin']:.3f}, "
            f"chosen mean log-prob {-before['anchor']:.3f} -> {-after['anchor']:.3f}")
    sft_table = eval_table(sft_result["eval_before"], sft_result["eval_after"])
    sections = [
        "## Training", "",
        f"Bucket-Aware SFT: {sft_result['summary']['steps']} steps; eval loss per bucket (mean "
        "token CE per example, averaged within the bucket) on the validation records, before and "
        "after:", "", sft_table, "",
        f"HDPO: {hdpo_result['summary']['steps']} steps on {len(fit_pairs)} pairs. {held}.", "",
        "SFT vs HDPO on the test prompts (oracle profile): eval loss, mean band distance of the "
        "generations to the bucket's human support (lower is better), share of generations in "
        "the human length bin:", "", table, ""]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(report_markdown(evals, sections))
    total = time.perf_counter() - t0
    summary = {"seconds": total, "sft_tokens_per_s": sft_result["summary"]["tokens_per_s"],
               "hdpo_tokens_per_s": hdpo_result["summary"]["tokens_per_s"],
               "pairs": dict(counts), "hdpo_final": {k: v for k, v in (hdpo_result["eval_after"] or {}).items()
                                                     if k != "buckets"},
               "eval_loss": {k: v["loss"] for k, v in report.items()},
               "eval_macro": {f"{e['title']} {e['profile']}": e["macro"] for e in evals}}
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    say("7/7 done")
    print("\nSFT eval loss per bucket, before and after Bucket-Aware SFT:")
    print(sft_table)
    print("\nSFT vs HDPO on the test prompts: eval loss (mean token CE), mean band distance of the "
          "generations to the bucket's human support (lower is better), share of generations in "
          "the human length bin:")
    print(table)
    keys = [("f1", "F1"), ("bng", "BNG"), ("hcr", "HCR"), ("distance", "dist"),
            ("bin_agreement", "bin"), ("length_w1", "len W1"), ("tdm", "TDM"),
            ("distinct_2", "dist-2"), ("self_bleu4", "self-BLEU4")]
    print("\nEvaluation report (macro over buckets; BNG/HCR/dist against TRAIN humans) -> "
          f"{os.path.join(out, 'report.md')}:")
    print(format_table(["model (profile)"] + [k[1] for k in keys],
                       [[f"{e['title']} ({e['profile']})"] + [e["macro"].get(k, float("nan"))
                                                              for k, _ in keys] for e in evals]))
    print(f"\n{held}")
    print("\n" + "\n".join(comparisons(evals)).strip())
    print(f"SFT {summary['sft_tokens_per_s']:,.0f} tokens/s, HDPO {summary['hdpo_tokens_per_s']:,.0f} "
          f"tokens/s; demo finished in {total:.1f}s")
    return summary
