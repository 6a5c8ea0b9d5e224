"""End-to-end training throughput: polyfast against the authors' setup, side by side in one run.

    python -m bench.train                                  # CPU: the demo model on the demo data
    python -m bench.train --model qwen2.5-1.5b --max-tokens 8192 --steps 8    # a GPU

Four modes, each in a fresh process (so that peak memory is its own), same init, same data:

  sft   polyfast   SFTTrainer: bucket packs of ``--max-tokens``, varlen attention, fused loss kernel
  sft   baseline   the authors' setup: one example per forward (batch of one), SDPA, the model's own
                   full-vocabulary logits and loss, the same number of examples per optimizer step
  hdpo  polyfast   HDPOTrainer: pair packs, one joint log-prob kernel for policy and live reference
  hdpo  baseline   one pair per forward (chosen and rejected padded into a batch of two), full
                   logits -> log_softmax -> gather, a separate reference forward every step

The HDPO modes start from the same random-init checkpoint (written once) and train on pairs whose
rejected side is the human response with its words reversed; distances are the text-feature band
distance (computed once, before timing). The first ``--warmup`` steps are not timed.

Reported: tokens/s of real tokens (no padding), step time, peak memory (CUDA: max allocated; CPU:
the process's peak resident set, which includes the Python runtime) and MFU. Model FLOPs per token
come from the config: 2 x (the decoder's matmul parameters + the head) per token and forward, plus
causal attention 2 x layers x heads x head_dim x sum(len^2); training = 3 forwards, the frozen
reference 1 forward; activation-checkpoint recompute is not counted. MFU needs the device's dense
bf16 peak (known cards, or ``--peak-tflops``); a CPU has none.

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

from bench.harness import append_jsonl, machine, markdown_table, read_runs, run_isolated

MODELS = {
    "demo": {},  # the demo's tiny Llama (polyfast.cli.DEMO_SFT), byte vocabulary
    "demo-151k": {"vocab_size": 151936},  # the same with Qwen2.5's vocabulary size: a real head
    "qwen2.5-1.5b": {"arch": "qwen2", "hidden_size": 1536, "num_layers": 28, "num_heads": 12,
                     "num_kv_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
}
# dense bf16 tensor-core peak, TFLOP/s (vendor datasheets); first match on the device name wins
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("A10G", 125.0)]
MODES = ["sft:polyfast", "sft:baseline", "hdpo:polyfast", "hdpo:baseline"]


# ---------------------------------------------------------------------------------------------
# data, config, FLOPs


def _records(scale: int):
    """The demo's train records, ``scale`` times (copies get new ids)."""
    import dataclasses

    from polyfast.data import demo_records
    recs = demo_records("train")
    return [r if k == 0 else dataclasses.replace(r, id=f"{r.id}#{k}")
            for k in range(scale) for r in recs]


def _reverse_words(text: str) -> str:
    return " ".join(text.split()[::-1]) if " " in text else text[::-1]


def _fit(examples, max_tokens: int):
    """Examples fitted to a pack (prompts cut from the left); those that cannot fit are left out."""
    from polyfast.data.tokenize import fit_length
    return [e for e in (fit_length(x, max_tokens) for x in examples) if e is not None]


def _overrides(args) -> dict:
    from polyfast.cli import DEMO_SFT, _flatten
    extra = _flatten(DEMO_SFT)
    extra.update({f"model.tiny.{k}": v for k, v in MODELS[args.model].items()})
    extra.update({"data.max_tokens": args.max_tokens, "data.val": None, "train.max_steps": 10**6,
                  "train.grad_accum": args.grad_accum, "train.progress": False,
                  "train.warmup_ratio": 0.0, "train.lr": 1e-5,
                  "model.activation_checkpointing": args.activation_checkpointing})
    return extra


def flops_per_forward(config, lengths: list[int]) -> float:
    """Model FLOPs of one forward over sequences of ``lengths`` tokens (see the module docstring)."""
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or H // hq
    per_layer = H * hq * d * 2 + H * hkv * d * 2 + 3 * H * config.intermediate_size
    tokens = sum(lengths)
    return 2.0 * (L * per_layer + H * V) * tokens + 2.0 * L * hq * d * sum(n * n for n in lengths)


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
    recs = _records(args.scale)
    weights = bucket_weights(recs)
    exs = _fit(encode_records(tok, recs, weights=weights), args.max_tokens)
    tr = SFTTrainer(cfg, data=PreparedData(exs, [], weights, sorted(weights)), tokenizer=tok)

    def step(s):
        packs = tr.step_packs(s % tr.steps_per_epoch)
        tr.train_step(packs)
        return [len(e) for p in packs for e in p]
    per_step = len(exs) / len(tr._packs(0)) * args.grad_accum
    return step, tr.model.config, tr.device, 3, {"examples_per_step": per_step}


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
    recs = _records(args.scale)
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
        return [len(e) for e in batch]
    return step, model.config, device, 3, {"examples_per_step": k}


def _hdpo_pairs(args):
    from polyfast.data import make_pairs
    recs = [r for r in _records(args.scale) if r.response.strip()]
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


def _hdpo_config(args, tmp, start):
    from polyfast.config import HDPOConfig, load_config
    o = _overrides(args)
    extra = {k: v for k, v in o.items() if k.startswith(("train.", "model.activation"))}
    extra.update({"model.path": start, "run_dir": os.path.join(tmp, "hdpo"),
                  "data.max_tokens": args.max_tokens, "hdpo.distance": "feature",
                  "hdpo.reference": "live", "model.liger": args.liger,
                  "model.compile": args.compile})
    return load_config(HDPOConfig, None, [], extra=extra)


def _hdpo_polyfast(args, tmp):
    from polyfast.train.hdpo import HDPOTrainer

    cfg = _hdpo_config(args, tmp, _start_checkpoint(args, tmp))
    tr = HDPOTrainer(cfg, pairs=_hdpo_pairs(args))

    def step(s):
        packs = tr.step_packs(s % tr.steps_per_epoch)
        tr.train_step(packs)
        return [len(x) for p in packs for pair in p for x in (pair.chosen, pair.rejected)]
    per_step = len(tr.examples) / len(tr._packs(0)) * args.grad_accum
    return step, tr.model.config, tr.device, 4, {"pairs_per_step": per_step}


def _hdpo_baseline(args, tmp):
    import dataclasses
    import random

    import numpy as np

    from polyfast.critic import FEATURE_NAMES, References, feature_matrix
    from polyfast.data import load_tokenizer
    from polyfast.data.packing import pack_pairs, to_device
    from polyfast.losses import hdpo_loss
    from polyfast.model import load_model, resolve_device
    from polyfast.train.hdpo import encode_pairs
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
    examples, _ = encode_pairs(tok, pairs, cfg.data.system_prompt, args.max_tokens, "truncate_left")
    recs = [p.record for p in pairs]
    refs = References.build(recs, feature_matrix(r.response for r in recs), FEATURE_NAMES,
                            cfg.hdpo.min_bucket_size)
    buckets = [p.bucket_id for p in pairs]
    dc = refs.distance(feature_matrix(p.chosen for p in pairs), buckets)
    dr = refs.distance(feature_matrix(p.rejected for p in pairs), buckets)
    assert np.isfinite(dc).all() and np.isfinite(dr).all()
    # per pair, on the device once: (distance chosen, distance rejected, weight, chosen tokens)
    n_chosen = np.zeros(len(pairs))
    n_chosen[[e.index for e in examples]] = [e.chosen.n_response for e in examples]
    per_pair = torch.tensor(np.stack([dc, dr, [p.weight for p in pairs], n_chosen], 1),
                            dtype=torch.float32, device=device)  # (n_pairs, 4)
    random.Random(0).shuffle(examples)
    k = max(1, round(len(examples) / len(pack_pairs(examples, args.max_tokens)) * args.grad_accum))
    h = cfg.hdpo

    def logps(model, ids, mask, labels):  # full logits -> log_softmax -> gather; (2,) sums
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (2, L-1, V)
        target = labels[:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
        return (lp * (target != -100)).sum(-1)

    def step(s):
        batch = [examples[(s * k + i) % len(examples)] for i in range(k)]
        wsum = sum(pairs[e.index].weight for e in batch)
        lengths = []
        for e in batch:  # chosen and rejected padded into a batch of two
            sides = (e.chosen, e.rejected)
            L = max(len(x) for x in sides)
            ids = torch.zeros(2, L, dtype=torch.long)
            mask = torch.zeros(2, L, dtype=torch.long)
            labels = torch.full((2, L), -100)
            for row, x in enumerate(sides):
                ids[row, :len(x)] = torch.tensor(x.input_ids)
                mask[row, :len(x)] = 1
                labels[row, x.n_prompt:len(x)] = ids[row, x.n_prompt:len(x)]
            ids, mask, labels = (to_device(t, device) for t in (ids, mask, labels))
            with autocast:
                pol = logps(policy, ids, mask, labels)
                with torch.no_grad():
                    ref = logps(reference, ids, mask, labels)  # a separate reference forward
            d_c, d_r, w, n_c = per_pair[e.index:e.index + 1].unbind(1)  # each (1,)
            loss, _ = hdpo_loss(pol[:1], pol[1:], ref[:1], ref[1:], d_c, d_r, w, n_c, beta=h.beta,
                                reg_lambda=h.reg_lambda, ftx=h.ftx, weight_sum=wsum, num_pairs=k)
            loss.backward()
            lengths += [len(x) for x in sides]
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return lengths
    return step, policy.config, device, 4, {"pairs_per_step": k}


RUNNERS = {"sft:polyfast": _sft_polyfast, "sft:baseline": _sft_baseline,
           "hdpo:polyfast": _hdpo_polyfast, "hdpo:baseline": _hdpo_baseline}


def run_one(mode: str, args) -> dict:
    """Build ``mode``, run its warm-up and timed steps; one result row."""
    with tempfile.TemporaryDirectory(prefix="polyfast-bench-train-") as tmp:
        step, config, device, forwards, info = RUNNERS[mode](args, tmp)
        for s in range(args.warmup):
            step(s)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        lengths: list[int] = []
        t0 = time.perf_counter()
        for s in range(args.warmup, args.warmup + args.steps):
            lengths += step(s)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
        flops = forwards * flops_per_forward(config, lengths)
        kind, impl = mode.split(":")
        return {"mode": kind, "impl": impl, "steps": args.steps, "seconds": dt,
                "tokens": sum(lengths), "tokens_per_s": sum(lengths) / dt,
                "step_ms": dt / args.steps * 1e3, "peak_mb": peak, "flops": flops,
                "flops_per_s": flops / dt, **info}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=2048, help="pack capacity (polyfast)")
    p.add_argument("--grad-accum", type=int, default=1, help="packs per optimizer step")
    p.add_argument("--scale", type=int, default=1, help="copies of the demo data")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--liger", action="store_true", help="model.liger for the polyfast modes")
    p.add_argument("--compile", action="store_true", help="model.compile for the polyfast modes")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--out", default="bench/results/train.jsonl")
    p.add_argument("--mode-timeout", type=float, default=3600, help="seconds per mode")
    p.add_argument("--table", metavar="JSONL", help="print the table of the last run in JSONL and exit")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode in this process
    return p, p.parse_args(argv)


def render(rows: list[dict]) -> str:
    """The markdown table of one run's rows (tokens/s relative to the baseline of the same mode)."""
    if not rows:
        return "train: no rows"
    info = rows[0]
    tps = {(r["mode"], r["impl"]): r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["mode"], r["impl"], None, None, None, None, None, None,
                          f"failed: {r['error']}"])
            continue
        base = tps.get((r["mode"], "baseline"))
        table.append([r["mode"], r["impl"], r["steps"], r["tokens"], r["tokens_per_s"],
                      r["step_ms"], r["peak_mb"],
                      f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a",
                      r["tokens_per_s"] / base if base else None])
    flags = [f for f in ("activation_checkpointing", "liger", "compile") if info.get(f)]
    out = (f"End-to-end training, model {info['model']}, packs of {info['max_tokens']} tokens, "
           f"grad_accum {info['grad_accum']}{', ' + ', '.join(flags) if flags else ''}; "
           f"{info['device']}, torch {info['torch']}, {info['date']}\n\n")
    out += markdown_table(["mode", "impl", "steps", "real tokens", "tokens/s", "step ms",
                           "peak MB", "MFU", "vs baseline"], table)
    sft, hdpo = tps.get(("sft", "polyfast")), tps.get(("hdpo", "polyfast"))
    if sft and hdpo:
        out += f"\n\nHDPO / SFT tokens/s (polyfast): {hdpo / sft:.2f}"
    return out


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
    for mode in args.modes:
        r = run_isolated("bench.train", ["--one", mode, *passthrough], timeout=args.mode_timeout)
        kind, impl = mode.split(":")
        row = {"bench": "train", "model": args.model, "max_tokens": args.max_tokens,
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
    ok = [r for r in rows if "error" not in r]
    print(json.dumps({"bench": "train", "machine": info, "model": args.model,
                      "tokens_per_s": {f"{r['mode']}:{r['impl']}": r["tokens_per_s"] for r in ok},
                      "mfu": {f"{r['mode']}:{r['impl']}": r["mfu"] for r in ok}}))
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
