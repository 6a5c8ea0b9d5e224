"""Batched generation with a KV cache from an exported checkpoint (transformers' ``generate``).

Prompts are the records' chat prompts (with or without the profile system prompt), left-padded and
grouped by length; output rows keep the record id and bucket. ``num_samples`` K > 1 samples K
responses per prompt (``do_sample``): the row's ``predictions`` holds all K, ``prediction`` the
first (what evaluation reads); ``polyfast pairs`` turns them into K pairs that share the prompt.

A predictions file read back (``load_predictions``, ``load_samples``) is decoded as JSON lines; a
bad row is a DataError naming it.
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
    num_samples: int = 1         # responses per prompt (more than one needs do_sample)
    profile: str = ""            # the evaluation profile label the rows carry (oracle|prior|none)

    def __post_init__(self):
        from ..errors import ConfigError
        if self.num_samples < 1:
            raise ConfigError("num_samples", f"must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and not self.do_sample:
            raise ConfigError("num_samples", "several responses per prompt need sampling "
                              "(--sample): greedy decoding gives the same response each time")


def load_for_generation(path: str, device: str | torch.device = "cpu", key: str = "--model"):
    """An exported run (``RUN/final`` or ``RUN``) and its tokenizer, with SDPA attention; a
    directory that holds none is a ConfigError naming ``key`` and the path."""
    from ..data.tokenize import load_tokenizer
    from ..model import load_pretrained

    if os.path.isdir(os.path.join(path, "final")):
        path = os.path.join(path, "final")
    model = load_pretrained(path, key, attn_implementation="sdpa").to(device).eval()
    return model, load_tokenizer(path)


def prompt_budget(model, cfg: GenerationConfig) -> int | None:
    """The longest prompt that leaves room for ``max_new_tokens`` in the model's context; None
    when the model states no context length."""
    from ..errors import ConfigError

    ctx = getattr(model.config, "max_position_embeddings", None)
    if not ctx:
        return None
    if ctx - cfg.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"{cfg.max_new_tokens} new tokens leave no room for "
                          f"a prompt in the model's context of {ctx} tokens")
    return ctx - cfg.max_new_tokens


@torch.no_grad()
def generate(model, tokenizer, records: Sequence[Record], cfg: GenerationConfig = GenerationConfig(),
             progress: bool = True) -> list[dict]:
    """One row per record: {"id", "bucket_id", "prediction", "prompt_tokens", "new_tokens",
    "prompt_truncated"} (+ "profile" when ``cfg.profile`` is set), and with ``cfg.num_samples``
    K > 1 "predictions" (K strings) and "new_tokens" for each. A prompt longer than the model's
    context less ``max_new_tokens`` is cut from the left; "prompt_truncated" counts the tokens
    cut."""
    from ..model import set_packed

    set_packed(model, False)
    model.eval()
    device = next(model.parameters()).device
    prompts = [tokenizer.apply_chat_template(messages_for(r, cfg.system)[:-1], tokenize=False,
                                             add_generation_prompt=True) for r in records]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    budget = prompt_budget(model, cfg)
    cut = [max(0, len(e) - budget) if budget else 0 for e in encoded]
    encoded = [e[c:] for e, c in zip(encoded, cut)]
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
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                      num_return_sequences=cfg.num_samples)
        if cfg.do_sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
        gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, L:]  # (B*K, new)
        K = cfg.num_samples
        for n, i in enumerate(idx):
            texts, lengths = [], []
            for row in gen[n * K:(n + 1) * K].tolist():  # the K samples of prompt i, in order
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                row = [t for t in row if t != pad]
                texts.append(tokenizer.decode(row, skip_special_tokens=True))
                lengths.append(len(row))
            rec = records[i]
            out[i] = {"id": rec.id, "bucket_id": rec.bucket_id, "prediction": texts[0],
                      "prompt_tokens": len(encoded[i]), "new_tokens": lengths[0],
                      "prompt_truncated": cut[i]}
            if cfg.profile:
                out[i]["profile"] = cfg.profile
            if K > 1:
                out[i].update(predictions=texts, new_tokens=lengths)
        bar.update(len(idx))
    bar.close()
    return out


def save_predictions(rows: Sequence[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _prediction_rows(path: str):
    """(row number, id, row) of a predictions JSONL file; a row without {"id", "prediction": str}
    (and, if present, "predictions": a list of strings), or that repeats an id, is a DataError
    naming the row."""
    from ..errors import DataError

    if not os.path.isfile(path):
        raise DataError("is a directory, not a predictions file" if os.path.isdir(path)
                        else "no such file", path)
    rows = {}
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
            many = row.get("predictions")
            if many is not None and not (isinstance(many, list) and many
                                         and all(isinstance(x, str) for x in many)):
                raise DataError("'predictions' must be a non-empty list of strings", path, n)
            if key in rows:
                raise DataError(f"duplicate id {key!r} (first at row {rows[key]})", path, n)
            rows[key] = n
            yield n, key, row


def load_predictions(path: str) -> dict[str, str]:
    """id -> prediction (the first sample where a row holds several) from a predictions JSONL
    file; bad rows are DataErrors naming the row."""
    return {key: row["prediction"] for _, key, row in _prediction_rows(path)}


def predictions_profile(path: str) -> str | None:
    """The profile label ``generate`` stored in a predictions file (None when its rows have
    none); rows that disagree are a DataError naming the first that differs."""
    from ..errors import DataError

    label, first = None, None
    for n, _, row in _prediction_rows(path):
        p = row.get("profile")
        if first is None:
            label, first = p, n
        elif p != label:
            raise DataError(f"profile {p!r} differs from row {first}'s {label!r}: the file mixes "
                            "generations of several profiles", path, n)
    return label


def load_samples(path: str) -> dict[str, list[str]]:
    """id -> every response of the row ("predictions", else ["prediction"])."""
    return {key: row.get("predictions") or [row["prediction"]]
            for _, key, row in _prediction_rows(path)}
