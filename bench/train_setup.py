"""The end-to-end benchmark's data and configs: the demo records or the authors' sample, the
examples fitted to a pack, the overrides every mode shares, the HDPO pairs and the random-init
checkpoint the HDPO modes start from (``python -m polyfast.bench.train``)."""

from __future__ import annotations

import os

import torch

MODELS = {
    "demo": {},  # the demo's tiny Llama (polyfast.pipeline.DEMO_SFT), byte vocabulary
    "demo-151k": {"vocab_size": 151936},  # the same with Qwen2.5's vocabulary size: a real head
    "qwen2.5-1.5b": {"arch": "qwen2", "hidden_size": 1536, "num_layers": 28, "num_heads": 12,
                     "num_kv_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "qwen2.5-7b": {"arch": "qwen2", "hidden_size": 3584, "num_layers": 28, "num_heads": 28,
                   "num_kv_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False},
}
# dense bf16 tensor-core peak, TFLOP/s (vendor datasheets); first match on the device name wins

SAMPLE_FILES = ("dist_sft_val.json", "dist_sft_test.json")

def sample_dir() -> str:
    """Where the authors' released sample is: ``$POLYFAST_SAMPLE``, else beside the checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("POLYFAST_SAMPLE") or os.path.join(root, "..", "shared", "data",
                                                             "polyalign_sample")

def records(args):
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

def reverse_words(text: str) -> str:
    return " ".join(text.split()[::-1]) if " " in text else text[::-1]

def fit_examples(examples, max_tokens: int):
    """Examples fitted to a pack (prompts cut from the left); those that cannot fit are left out."""
    from polyfast.data.tokenize import fit_length
    return [e for e in (fit_length(x, max_tokens) for x in examples) if e is not None]

def overrides(args) -> dict:
    from polyfast.config import flatten
    from polyfast.pipeline import DEMO_SFT
    extra = flatten(DEMO_SFT)
    extra.update({f"model.tiny.{k}": v for k, v in MODELS[args.model].items()})
    extra.update({"data.max_tokens": args.max_tokens, "data.val": None, "train.max_steps": 10**6,
                  "train.grad_accum": args.grad_accum, "train.progress": False,
                  "train.warmup_ratio": 0.0, "train.lr": 1e-5,
                  "model.activation_checkpointing": args.activation_checkpointing,
                  "model.dtype": getattr(args, "dtype", "auto")})
    return extra

def hdpo_pairs(args):
    from polyfast.data import make_pairs
    recs = [r for r in records(args) if r.response.strip()]
    pairs, _ = make_pairs(recs, {r.id: reverse_words(r.response) for r in recs})
    return pairs

def start_checkpoint(args, tmp) -> str:
    """The random-init model both HDPO modes start from, saved once per process."""
    from polyfast.config import SFTConfig, load_config
    from polyfast.data import byte_tokenizer
    from polyfast.model import load_model, resolve_device
    from polyfast.train.checkpoint import export_pretrained

    tok = byte_tokenizer()
    cfg = load_config(SFTConfig, None, [], extra=overrides(args))
    # initialised on the GPU: a 1.5B-parameter random init takes half a minute on the CPU
    model = load_model(cfg.model, tok, seed=cfg.seed, device=resolve_device("auto"))
    if torch.cuda.is_available():  # half the bytes to write and read; both modes load this file
        model = model.to(torch.bfloat16)
    return export_pretrained(model, tok, os.path.join(tmp, "start"))

def hdpo_config(args, tmp, start, shared: bool = True, more: dict | None = None):
    from polyfast.config import HDPOConfig, load_config
    o = overrides(args)
    extra = {k: v for k, v in o.items() if k.startswith(("train.", "model.activation",
                                                          "model.dtype"))}
    extra.update({"model.path": start, "run_dir": os.path.join(tmp, "hdpo"),
                  "data.max_tokens": args.max_tokens, "hdpo.distance": "feature",
                  "hdpo.reference": "live", "model.liger": args.liger,
                  "model.compile": args.compile, "hdpo.prefix_sharing": shared, **(more or {})})
    return load_config(HDPOConfig, None, [], extra=extra)
