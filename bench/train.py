"""End-to-end training throughput: polyfast against the authors' setup, side by side in one run.

    python -m polyfast.bench.train                     # CPU: the demo model on the demo data
    python -m polyfast.bench.train --model qwen2.5-1.5b --max-tokens 8192 --steps 8   # a GPU
    python -m polyfast.bench.train --mode hdpo --data sample --limit 600 --max-tokens 4096 --steps 0
                                  # prefix sharing: one epoch on 600 records of the authors' sample

Five modes, each in a fresh process (so that peak memory is its own), same init, same data:

  sft   polyfast   SFTTrainer: bucket packs of ``--max-tokens``, varlen attention, fused loss kernel
  sft   baseline   the authors' setup: one example per forward (batch of one), SDPA, the model's own
                   full-vocabulary logits and loss, the same number of examples per optimizer step
  hdpo  polyfast   HDPOTrainer: group packs with each prompt once (prefix sharing), one joint
                   log-prob kernel for policy and live reference
  hdpo  unshared   the same with ``hdpo.prefix_sharing: false``: the prompt once per response
  hdpo  baseline   one pair per forward (chosen and rejected padded into a batch of two), full
                   logits -> log_softmax -> gather, a separate reference forward every step

The HDPO modes start from the same random-init checkpoint (written once) and train on pairs whose
rejected side is the human response with its words reversed; distances are the text-feature band
distance (computed once, before timing). ``--data demo`` (default) uses the built-in records
(``--scale`` copies), ``--data sample`` the authors' released sample (``$POLYFAST_SAMPLE`` or
``../shared/data/polyalign_sample`` beside the checkout): ``--limit`` a seeded random subset of its
records, ``--per-bucket`` at most that many of each bucket.
The first ``--warmup`` steps are not timed; ``--steps 0`` times one whole epoch of packs.

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

from .harness import RESULTS, append_jsonl, machine, markdown_table, read_runs, run_isolated

MODELS = {
    "demo": {},  # the demo's tiny Llama (polyfast.pipeline.DEMO_SFT), byte vocabulary
    "demo-151k": {"vocab_size": 151936},  # the same with Qwen2.5's vocabulary size: a real head
    "qwen2.5-1.5b": {"arch": "qwen2", "hidden_size": 1536, "num_layers": 28, "num_heads": 12,
                     "num_kv_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
}
# dense bf16 tensor-core peak, TFLOP/s (vendor datasheets); first match on the device name wins
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("A10G", 125.0)]
MODES = ["sft:polyfast", "sft:baseline", "hdpo:polyfast", "hdpo:unshared", "hdpo:baseline"]
SAMPLE_FILES = ("dist_sft_val.json", "dist_sft_test.json")


# ---------------------------------------------------------------------------------------------
# data, config, FLOPs


def sample_dir() -> str:
    """Where the authors' released sample is: ``$POLYFAST_SAMPLE``, else beside the checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("POLYFAST_SAMPLE") or os.path.join(root, "..", "shared", "data",
                                                             "polyalign_sample")


def _records(args):
    """The benchmark's records: the demo's train records ``--scale`` times (copies get new ids),
    or the authors' sample (``--limit``, ``--per-bucket``)."""
    import dataclasses

    from polyfast.data import demo_records, load_records
    if args.data == "sample":
        import random

        from polyfast.pipeline import stratified
        folder = sample_dir()
        if not os.path.isdir(folder):
            raise SystemExit(f"the authors' sample is not at {folder}: set POLYFAST_SAMPLE")
        recs = [r for name in SAMPLE_FILES for r in load_records(os.path.join(folder, name))]
        recs = [r for r in recs if r.response.strip()]
        if args.limit:  # a seeded uniform subset: the sample's own mix of buckets
            recs = random.Random(0).sample(recs, min(args.limit, len(recs)))
        return stratified(recs, args.per_bucket) if args.per_bucket else recs
    recs = demo_records("train")
    return [r if k == 0 else dataclasses.replace(r, id=f"{r.id}#{k}")
            for k in range(args.scale) for r in recs]


def _reverse_words(text: str) -> str:
    return " ".join(text.split()[::-1]) if " " in text else text[::-1]


def _fit(examples, max_tokens: int):
    """Examples fitted to a pack (prompts cut from the left); those that cannot fit are left out."""
    from polyfast.data.tokenize import fit_length
    return [e for e in (fit_length(x, max_tokens) for x in examples) if e is not None]


def _overrides(args) -> dict:
    from polyfast.config import flatten
    from polyfast.pipeline import DEMO_SFT
    extra = flatten(DEMO_SFT)
    extra.update({f"model.tiny.{k}": v for k, v in MODELS[args.model].items()})
    extra.update({"data.max_tokens": args.max_tokens, "data.val": None, "train.max_steps": 10**6,
                  "train.grad_accum": args.grad_accum, "train.progress": False,
                  "train.warmup_ratio": 0.0, "train.lr": 1e-5,
                  "model.activation_checkpointing": args.activation_checkpointing})
    return extra


def flops_per_forward(config, lengths: list[int], attn_sq: float | None = None) -> float:
    """Model FLOPs of one forward over sequences of ``lengths`` tokens (see the module docstring);
    ``attn_sq`` replaces sum(len^2) where segments have more keys than queries."""
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or H // hq
    per_layer = H * hq * d * 2 + H * hkv * d * 2 + 3 * H * config.intermediate_size
    tokens = sum(lengths)
    if attn_sq is None:
        attn_sq = sum(n * n for n in lengths)
    return 2.0 * (L * per_layer + H * V) * tokens + 2.0 * L * hq * d * attn_sq


def _work(lengths, tokens=None, attn_sq=None, bucket=None) -> dict:
    """What a step did: the sequence lengths it computed, the tokens it is credited with (default:
    their sum), the attention's sum(len^2) equivalent and the bucket of its packs (None: several)."""
    return {"lengths": list(lengths), "tokens": sum(lengths) if tokens is None else tokens,
            "attn_sq": attn_sq, "bucket": bucket}


def group_work(groups) -> dict:
    """A step over preference groups: credited with their pair tokens (the unshared count)."""
    lengths, attn_sq = [], 0
    for g in groups:
        P = len(g.prompt)
        for j, r in enumerate(g.responses):
            if g.shared and j > 0:  # R queries over P + R keys
                lengths.append(len(r))
                attn_sq += 2 * len(r) * (P + len(r)) - len(r) ** 2
            else:
                lengths.append(P + len(r))
                attn_sq += (P + len(r)) ** 2
    buckets = {g.bucket for g in groups}
    return _work(lengths, sum(g.pair_tokens for g in groups), attn_sq,
                 buckets.pop() if len(buckets) == 1 else None)


def peak_flops(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for name, tflops in PEAK_TFLOPS:
        if name in device:
            return tflops * 1e12
    return None


# ---------------------------------------------------------------------------------------------
# the four modes: each returns (step function -> list of sequence lengths, model config, device,
# forwards per step counted in FLOPs: 3 for training, +1 per frozen model)


def _sft_polyfast(args, tmp):
    from polyfast.config import SFTConfig, load_config
    from polyfast.data import bucket_weights, byte_tokenizer, encode_records
    from polyfast.train.sft import PreparedData, SFTTrainer

    tok = byte_tokenizer()
    extra = {**_overrides(args), "run_dir": os.path.join(tmp, "sft"), "model.liger": args.liger,
             "model.compile": args.compile}
    cfg = load_config(SFTConfig, None, [], extra=extra)
    recs = _records(args)
    weights = bucket_weights(recs)
    exs = _fit(encode_records(tok, recs, weights=weights), args.max_tokens)
    tr = SFTTrainer(cfg, data=PreparedData(exs, [], weights, sorted(weights)), tokenizer=tok)

    def step(s):
        packs = tr.step_packs(s % tr.steps_per_epoch)
        tr.train_step(packs)
        return _work([len(e) for p in packs for e in p])
    per_step = len(exs) / len(tr._packs(0)) * args.grad_accum
    return step, tr.model.config, tr.device, 3, {"examples_per_step": per_step,
                                                 "steps_per_epoch": tr.steps_per_epoch}


def _sft_baseline(args, tmp):
    import random

    from polyfast.config import SFTConfig, load_config
    from polyfast.data import bucket_weights, byte_tokenizer, encode_records, pack_examples
    from polyfast.data.packing import to_device
    from polyfast.model import load_model, resolve_device
    from polyfast.train.optim import build_optimizer

    tok = byte_tokenizer()
    cfg = load_config(SFTConfig, None, [], extra={**_overrides(args), "run_dir": tmp})
    device = resolve_device("auto")
    model = load_model(cfg.model, tok, packed=False, seed=cfg.seed, device=device)
    opt = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    recs = _records(args)
    weights = bucket_weights(recs)
    exs = _fit(encode_records(tok, recs, weights=weights), args.max_tokens)
    random.Random(0).shuffle(exs)
    # as many examples per optimizer step as polyfast's packs hold on average
    k = max(1, round(len(exs) / len(pack_examples(exs, args.max_tokens)) * args.grad_accum))

    def step(s):
        batch = [exs[(s * k + i) % len(exs)] for i in range(k)]
        wsum = sum(e.weight for e in batch)
        for ex in batch:  # a batch of one: no packing, the model's full logits and loss
            ids = to_device(torch.tensor([ex.input_ids]), device)
            labels = ids.clone()
            labels[:, :ex.n_prompt] = -100
            with autocast:
                loss = model(input_ids=ids, labels=labels).loss
            (loss * ex.weight / wsum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return _work([len(e) for e in batch])
    return step, model.config, device, 3, {"examples_per_step": k,
                                           "steps_per_epoch": -(-len(exs) // k)}


def _hdpo_pairs(args):
    from polyfast.data import make_pairs
    recs = [r for r in _records(args) if r.response.strip()]
    pairs, _ = make_pairs(recs, {r.id: _reverse_words(r.response) for r in recs})
    return pairs


def _start_checkpoint(args, tmp) -> str:
    """The random-init model both HDPO modes start from, saved once per process."""
    from polyfast.config import SFTConfig, load_config
    from polyfast.data import byte_tokenizer
    from polyfast.model import load_model, resolve_device
    from polyfast.train.checkpoint import export_pretrained

    tok = byte_tokenizer()
    cfg = load_config(SFTConfig, None, [], extra=_overrides(args))
    # initialised on the GPU: a 1.5B-parameter random init takes half a minute on the CPU
    model = load_model(cfg.model, tok, seed=cfg.seed, device=resolve_device("auto"))
    if torch.cuda.is_available():  # half the bytes to write and read; both modes load this file
        model = model.to(torch.bfloat16)
    return export_pretrained(model, tok, os.path.join(tmp, "start"))


def _hdpo_config(args, tmp, start, shared: bool = True):
    from polyfast.config import HDPOConfig, load_config
    o = _overrides(args)
    extra = {k: v for k, v in o.items() if k.startswith(("train.", "model.activation"))}
    extra.update({"model.path": start, "run_dir": os.path.join(tmp, "hdpo"),
                  "data.max_tokens": args.max_tokens, "hdpo.distance": "feature",
                  "hdpo.reference": "live", "model.liger": args.liger,
                  "model.compile": args.compile, "hdpo.prefix_sharing": shared})
    return load_config(HDPOConfig, None, [], extra=extra)


def _hdpo_polyfast(args, tmp, shared: bool = True):
    from polyfast.train.hdpo import HDPOTrainer

    cfg = _hdpo_config(args, tmp, _start_checkpoint(args, tmp), shared)
    tr = HDPOTrainer(cfg, pairs=_hdpo_pairs(args))

    def step(s):
        packs = tr.step_packs(s % tr.steps_per_epoch)
        tr.train_step(packs)
        return group_work([g for p in packs for g in p])
    per_step = tr.counts["kept"] / len(tr._packs(0)) * args.grad_accum
    return step, tr.model.config, tr.device, 4, {"pairs_per_step": per_step,
                                                 "steps_per_epoch": tr.steps_per_epoch,
                                                 "prompt_share": prompt_share(tr.examples)}


def prompt_share(groups) -> dict[str, float]:
    """Per bucket, the prompts' share of the pair tokens (prompt once per side)."""
    prompt, total = {}, {}
    for g in groups:
        prompt[g.bucket] = prompt.get(g.bucket, 0) + 2 * len(g.prompt) * len(g.pairs)
        total[g.bucket] = total.get(g.bucket, 0) + g.pair_tokens
    return {b: prompt[b] / total[b] for b in sorted(total)}


def _hdpo_baseline(args, tmp):
    import dataclasses
    import random

    import numpy as np

    from polyfast.critic import FEATURE_NAMES, References, feature_matrix
    from polyfast.data import load_tokenizer
    from polyfast.data.groups import encode_groups, pack_groups
    from polyfast.data.packing import to_device
    from polyfast.losses import hdpo_loss
    from polyfast.model import load_model, resolve_device
    from polyfast.train.optim import build_optimizer

    start = _start_checkpoint(args, tmp)
    cfg = _hdpo_config(args, tmp, start)
    tok = load_tokenizer(start)
    device = resolve_device("auto")
    plain = dataclasses.replace(cfg.model, liger=False, compile=False)
    policy = load_model(plain, tok, packed=False, device=device)
    reference = load_model(dataclasses.replace(plain, activation_checkpointing=False), tok,
                           packed=False, device=device).eval().requires_grad_(False)
    opt = build_optimizer(policy, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    pairs = _hdpo_pairs(args)
    groups, _ = encode_groups(tok, pairs, system=cfg.data.system_prompt, max_tokens=args.max_tokens,
                              shared=False)
    # one pair at a time: (pair index, bucket, chosen ids, rejected ids, prompt length)
    examples = [(i, g.bucket, g.prompt + g.responses[c], g.prompt + g.responses[r], len(g.prompt))
                for g in groups for i, c, r in g.pairs]
    recs = [p.record for p in pairs]
    refs = References.build(recs, feature_matrix(r.response for r in recs), FEATURE_NAMES,
                            cfg.hdpo.min_bucket_size)
    buckets = [p.bucket_id for p in pairs]
    dc = refs.distance(feature_matrix(p.chosen for p in pairs), buckets)
    dr = refs.distance(feature_matrix(p.rejected for p in pairs), buckets)
    assert np.isfinite(dc).all() and np.isfinite(dr).all()
    # per pair, on the device once: (distance chosen, distance rejected, weight, chosen tokens)
    n_chosen = np.zeros(len(pairs))
    n_chosen[[e[0] for e in examples]] = [len(e[2]) - e[4] for e in examples]
    per_pair = torch.tensor(np.stack([dc, dr, [p.weight for p in pairs], n_chosen], 1),
                            dtype=torch.float32, device=device)  # (n_pairs, 4)
    random.Random(0).shuffle(examples)
    k = max(1, round(len(examples) / len(pack_groups(groups, args.max_tokens)) * args.grad_accum))
    h = cfg.hdpo

    def logps(model, ids, mask, labels):  # full logits -> log_softmax -> gather; (2,) sums
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (2, L-1, V)
        target = labels[:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        return (lp * (target != -100)).sum(-1)

    def step(s):
        batch = [examples[(s * k + i) % len(examples)] for i in range(k)]
        wsum = sum(pairs[e[0]].weight for e in batch)
        lengths = []
        for index, _, *sides, n_prompt in batch:  # chosen and rejected padded into a batch of two
            L = max(len(x) for x in sides)
            ids = torch.zeros(2, L, dtype=torch.long)
            mask = torch.zeros(2, L, dtype=torch.long)
            labels = torch.full((2, L), -100)
            for row, x in enumerate(sides):
                ids[row, :len(x)] = torch.tensor(x)
                mask[row, :len(x)] = 1
                labels[row, n_prompt:len(x)] = ids[row, n_prompt:len(x)]
            ids, mask, labels = (to_device(t, device) for t in (ids, mask, labels))
            with autocast:
                pol = logps(policy, ids, mask, labels)
                with torch.no_grad():
                    ref = logps(reference, ids, mask, labels)  # a separate reference forward
            d_c, d_r, w, n_c = per_pair[index:index + 1].unbind(1)  # each (1,)
            loss, _ = hdpo_loss(pol[:1], pol[1:], ref[:1], ref[1:], d_c, d_r, w, n_c, beta=h.beta,
                                reg_lambda=h.reg_lambda, ftx=h.ftx, weight_sum=wsum, num_pairs=k)
            loss.backward()
            lengths += [len(x) for x in sides]
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        buckets = {e[1] for e in batch}
        return _work(lengths, bucket=buckets.pop() if len(buckets) == 1 else None)
    return step, policy.config, device, 4, {"pairs_per_step": k,
                                            "steps_per_epoch": -(-len(examples) // k)}


RUNNERS = {"sft:polyfast": _sft_polyfast, "sft:baseline": _sft_baseline,
           "hdpo:polyfast": _hdpo_polyfast,
           "hdpo:unshared": lambda args, tmp: _hdpo_polyfast(args, tmp, shared=False),
           "hdpo:baseline": _hdpo_baseline}


def run_one(mode: str, args) -> dict:
    """Build ``mode``, run its warm-up and timed steps (each timed alone); one result row."""
    with tempfile.TemporaryDirectory(prefix="polyfast-bench-train-") as tmp:
        step, config, device, forwards, info = RUNNERS[mode](args, tmp)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for s in range(args.warmup):
            step(s)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps = args.steps or info["steps_per_epoch"]  # 0: one whole epoch
        flops, tokens, computed, dt = 0.0, 0, 0, 0.0
        per_bucket: dict[str, list[float]] = {}  # bucket -> [tokens, seconds]
        for s in range(args.warmup, args.warmup + steps):
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


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
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
    if args.mode:
        args.modes = [m for m in args.modes if m.startswith(args.mode + ":")]
    return p, args


def best_rounds(rows: list[dict]) -> list[dict]:
    """One row per mode: its fastest round (``--repeat``), with every round's tokens/s, and per
    bucket the fastest round's time."""
    by_mode: dict[tuple, list[dict]] = {}
    for r in rows:
        by_mode.setdefault((r["mode"], r["impl"]), []).append(r)
    out = []
    for runs in by_mode.values():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out.append(runs[-1])
            continue
        best = dict(max(ok, key=lambda r: r["tokens_per_s"]))
        best["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in ok]
        buckets = {}
        for r in ok:
            for b, v in r.get("buckets", {}).items():
                if b not in buckets or v["tokens_per_s"] > buckets[b]["tokens_per_s"]:
                    buckets[b] = v
        best["buckets"] = dict(sorted(buckets.items()))
        out.append(best)
    return out


def render(rows: list[dict]) -> str:
    """The markdown table of one run's rows (tokens/s relative to the baseline of the same mode;
    the fastest of a mode's rounds)."""
    if not rows:
        return "train: no rows"
    rounds = max(r.get("attempt", 0) for r in rows) + 1
    rows = best_rounds(rows)
    info = rows[0]
    tps = {(r["mode"], r["impl"]): r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["mode"], r["impl"], None, None, None, None, None, None, None,
                          f"failed: {r['error']}"])
            continue
        base = tps.get((r["mode"], "baseline"))
        table.append([r["mode"], r["impl"], r["steps"], r["tokens"],
                      r.get("computed_tokens", r["tokens"]), r["tokens_per_s"],
                      r["step_ms"], r["peak_mb"],
                      f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a",
                      r["tokens_per_s"] / base if base else None])
    flags = [f for f in ("activation_checkpointing", "liger", "compile") if info.get(f)]
    data = "the demo data"
    if info.get("data") == "sample":
        data = "the authors' sample" + "".join(
            [f", a random {info['limit']} records" if info.get("limit") else "",
             f", at most {info['per_bucket']} per bucket" if info.get("per_bucket") else ""])
    best = f", the fastest of {rounds} rounds" if rounds > 1 else ""
    out = (f"End-to-end training, model {info['model']} on {data}, packs of {info['max_tokens']} tokens, "
           f"grad_accum {info['grad_accum']}{', ' + ', '.join(flags) if flags else ''}{best}; "
           f"{info['device']}, torch {info['torch']}, {info['date']}\n\n")
    out += markdown_table(["mode", "impl", "steps", "tokens", "computed", "tokens/s", "step ms",
                           "peak MB", "MFU", "vs baseline"], table)
    if any(r.get("mode") == "hdpo" for r in rows):
        out += ("\n\nHDPO tokens are pair tokens, the prompt counted once per side; 'computed' is "
                "what the mode ran through the model.")
    sft, hdpo = tps.get(("sft", "polyfast")), tps.get(("hdpo", "polyfast"))
    if sft and hdpo:
        out += f"\n\nHDPO / SFT tokens/s (polyfast): {hdpo / sft:.2f}"
    shared, unshared = tps.get(("hdpo", "polyfast")), tps.get(("hdpo", "unshared"))
    if shared and unshared:
        flops = {r["impl"]: r.get("flops") for r in rows if r.get("mode") == "hdpo"}
        bound = (f" (model FLOPs unshared / shared: {flops['unshared'] / flops['polyfast']:.2f})"
                 if flops.get("unshared") and flops.get("polyfast") else "")
        out += (f"\n\nPrefix sharing, HDPO pair tokens/s shared / unshared: "
                f"{shared / unshared:.2f}{bound}")
        out += "\n\n" + bucket_table(rows)
    return out


def bucket_table(rows: list[dict]) -> str:
    """HDPO pair tokens/s per bucket for each mode, the gain of prefix sharing, and what it could
    be: each bucket's prompt share of its pair tokens and the unshared / shared model FLOPs."""
    hdpo = {r["impl"]: r for r in rows if r.get("mode") == "hdpo" and "error" not in r}
    impls = [i for i in ("polyfast", "unshared", "baseline") if i in hdpo]
    buckets = sorted({b for r in hdpo.values() for b in r.get("buckets", {})})
    table = []
    for b in buckets:
        got = {i: hdpo[i]["buckets"].get(b, {}) for i in impls}
        tps = {i: got[i].get("tokens_per_s") for i in impls}
        shared, unshared = got.get("polyfast", {}), got.get("unshared", {})
        gain = (tps["polyfast"] / tps["unshared"]
                if tps.get("polyfast") and tps.get("unshared") else None)
        bound = (unshared["flops"] / shared["flops"]
                 if shared.get("flops") and unshared.get("flops") else None)
        share = hdpo["polyfast"].get("prompt_share", {}).get(b)
        table.append([b, share, bound, *(tps[i] for i in impls), gain])
    return markdown_table(["bucket", "prompt share", "FLOPs unshared / shared",
                           *(f"{i} tokens/s" for i in impls), "shared / unshared"], table)


def main(argv=None) -> int:
    _, args = _args(argv)
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
               "grad_accum": args.grad_accum, "activation_checkpointing":
               args.activation_checkpointing, "liger": args.liger, "compile": args.compile,
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
