"""Batched generation with a KV cache from an exported checkpoint (transformers' ``generate``).

Prompts are the records' chat prompts (with or without the profile system prompt), left-padded and
grouped by length; output rows keep the record id and bucket.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.records import Record
from ..data.tokenize import messages_for


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    system: str = "profile"      # profile | record | none
    seed: int = 0


def load_for_generation(path: str, device: str | torch.device = "cpu", key: str = "--model"):
    """An exported run (``RUN/final`` or ``RUN``) and its tokenizer, with SDPA attention; a
    directory that holds none is a ConfigError naming ``key`` and the path."""
    from ..data.tokenize import load_tokenizer
    from ..model import load_pretrained

    if os.path.isdir(os.path.join(path, "final")):
        path = os.path.join(path, "final")
    model = load_pretrained(path, key, attn_implementation="sdpa").to(device).eval()
    return model, load_tokenizer(path)


@torch.no_grad()
def generate(model, tokenizer, records: Sequence[Record], cfg: GenerationConfig = GenerationConfig(),
             progress: bool = True) -> list[dict]:
    """One row per record: {"id", "bucket_id", "prediction", "prompt_tokens", "new_tokens"}."""
    from ..model import set_packed

    set_packed(model, False)
    model.eval()
    device = next(model.parameters()).device
    prompts = [tokenizer.apply_chat_template(messages_for(r, cfg.system)[:-1], tokenize=False,
                                             add_generation_prompt=True) for r in records]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(records)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(cfg.seed)
    out: list[dict | None] = [None] * len(records)
    bar = tqdm(total=len(records), desc="generate", unit="ex", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(order), cfg.batch_size):
        idx = order[s:s + cfg.batch_size]
        L = max(len(encoded[i]) for i in idx)
        ids = torch.tensor([[pad] * (L - len(encoded[i])) + encoded[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (L - len(encoded[i])) + [1] * len(encoded[i]) for i in idx],
                            device=device)
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
        gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, L:]
        for row, i in zip(gen.tolist(), idx):
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            row = [t for t in row if t != pad]
            rec = records[i]
            out[i] = {"id": rec.id, "bucket_id": rec.bucket_id,
                      "prediction": tokenizer.decode(row, skip_special_tokens=True),
                      "prompt_tokens": len(encoded[i]), "new_tokens": len(row)}
        bar.update(len(idx))
    bar.close()
    return out


def save_predictions(rows: Sequence[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def load_predictions(path: str) -> dict[str, str]:
    """id -> prediction from a predictions JSONL file; a row that is not {"id", "prediction": str}
    or repeats an id is a DataError naming the row."""
    from ..errors import DataError

    if not os.path.isfile(path):
        raise DataError("is a directory, not a predictions file" if os.path.isdir(path)
                        else "no such file", path)
    preds, rows = {}, {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                key, pred = str(row["id"]), row["prediction"]
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 ({e.reason})", path, n) from None
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"not a prediction row ({e})", path, n) from None
            if not isinstance(pred, str):
                raise DataError(f"'prediction' must be a string, got {type(pred).__name__}", path, n)
            if key in rows:
                raise DataError(f"duplicate id {key!r} (first at row {rows[key]})", path, n)
            preds[key], rows[key] = pred, n
    return preds
