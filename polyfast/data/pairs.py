"""Preference pairs (docs/method.md section 3): chosen = the human response, rejected = a model's
prediction for the same prompt; pairs carry the record's bucket.

Formats read by :func:`load_pairs` (per row, .jsonl or .json, decoded as JSON like records):
- polyfast JSONL: a record's fields plus ``rejected`` (``chosen`` or ``response`` is the human side),
  ``weight``, ``chosen_dist``, ``rejected_dist``, ``pair_type``;
- the authors' LLaMA-Factory HDPO export: ``instruction``, ``input``, ``chosen``, ``rejected``,
  ``system``, ``history``, ``hdpo_weight``, ``chosen_dist_score``, ``rejected_dist_score``,
  ``critic_bucket_id`` and the bucket metadata.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .records import (Record, make_record, meta_fields, read_rows, row_history, row_number, row_str,
                      row_weight)

PAIR_BIAS = {"global": 0.0, "distribution": 1.0, "local": 0.5}


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (the record's context) with the human response (chosen) and a rejected one."""

    record: Record                 # record.response is the chosen (human) side
    rejected: str
    weight: float = 1.0            # hdpo_weight
    chosen_dist: float | None = None
    rejected_dist: float | None = None
    pair_type: str = "distribution"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def chosen(self) -> str:
        return self.record.response

    @property
    def bucket_id(self) -> str:
        return self.record.bucket_id

    def to_json(self) -> dict[str, Any]:
        d = self.record.to_json()
        d["chosen"] = d.pop("response")
        d.update(rejected=self.rejected, weight=self.weight, pair_type=self.pair_type)
        if self.chosen_dist is not None:
            d["chosen_dist"] = self.chosen_dist
        if self.rejected_dist is not None:
            d["rejected_dist"] = self.rejected_dist
        return d


def _parse_pair(row: Any, default_id: str, legacy_tokens: bool) -> PreferencePair:
    if not isinstance(row, dict):
        raise ValueError(f"a pair must be a JSON object, got {type(row).__name__}")
    authors = "instruction" in row or "hdpo_weight" in row
    chosen_key = "chosen" if "chosen" in row else "response"
    chosen = row_str(row, chosen_key, required=True)
    rejected = row_str(row, "rejected", required=True)
    if authors:
        question, context = row_str(row, "instruction"), row_str(row, "input")
        weight = row_weight(row, "hdpo_weight")
        dc, dr = row_number(row, "chosen_dist_score"), row_number(row, "rejected_dist_score")
    else:
        question, context = row_str(row, "question"), row_str(row, "context")
        weight = row_weight(row, "weight")
        dc, dr = row_number(row, "chosen_dist"), row_number(row, "rejected_dist")
    pair_type = row.get("pair_type", "distribution")
    if pair_type not in PAIR_BIAS:
        raise ValueError(f"pair_type {pair_type!r} is not one of {', '.join(PAIR_BIAS)}")
    known = {"instruction", "input", "chosen", "rejected", "system", "history", "hdpo_weight",
             "chosen_dist_score", "rejected_dist_score", "question", "context", "response", "id",
             "weight", "chosen_dist", "rejected_dist", "pair_type", "style_bucket", "split"}
    known |= {f.name for f in dataclasses.fields(Record)}
    record = make_record(id=row.get("id", default_id), response=chosen, question=question,
                         context=context, system=row_str(row, "system"), history=row_history(row),
                         split=row_str(row, "split"), legacy_tokens=legacy_tokens, **meta_fields(row),
                         meta={k: v for k, v in row.items() if k not in known})
    return PreferencePair(record, rejected, 1.0 if weight is None else weight, dc, dr, pair_type,
                          meta={"critic_bucket_id": row["critic_bucket_id"]}
                          if "critic_bucket_id" in row else {})


def load_pairs(path: str | os.PathLike, *, skip_bad_rows: bool = False,
               legacy_tokens: bool = False) -> list[PreferencePair]:
    """Read preference pairs (polyfast JSONL or the authors' HDPO export); bad rows raise DataError
    naming file and row (or are skipped and counted with ``skip_bad_rows``)."""
    # a record may have several pairs (one per sampled response), each rejected side once
    return read_rows(path, lambda row, default_id: _parse_pair(row, default_id, legacy_tokens),
                     skip_bad_rows=skip_bad_rows, kind="pairs",
                     unique=("pair (the same rejected side) of id",
                             lambda p: (p.id, p.rejected)))[0]


def save_pairs(pairs: Iterable[PreferencePair], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")


def make_pairs(records: Sequence[Record], predictions: dict[str, str | list[str]],
               pair_type: str = "distribution") -> tuple[list[PreferencePair], Counter]:
    """chosen = the human response, rejected = the prediction for the same record id; a list of
    predictions (several samples) gives one pair per sample, pairs that share their prompt.

    Drops (and counts) a pair whose record has no prediction, or either side of which is empty, or
    whose sides are equal, or whose rejected side repeats an earlier sample of the record (all
    compared after stripping whitespace).
    """
    pairs, counts = [], Counter()
    for rec in records:
        preds = predictions.get(rec.id)
        if preds is None:
            counts["dropped_no_prediction"] += 1
            continue
        seen = set()
        for pred in [preds] if isinstance(preds, str) else preds:
            problem = pair_problem(rec.response, pred)
            if problem is None and pred.strip() in seen:
                problem = "duplicate_sample"
            seen.add(pred.strip())
            if problem:
                counts[f"dropped_{problem}"] += 1
            else:
                pairs.append(PreferencePair(rec, pred, pair_type=pair_type))
    counts["kept"] = len(pairs)
    return pairs, counts


def pair_problem(chosen: str, rejected: str) -> str | None:
    """Why a pair teaches no preference ("empty_chosen", "empty_rejected", "equal": the sides
    compared after stripping whitespace), or None."""
    if not chosen.strip():
        return "empty_chosen"
    if not rejected.strip():
        return "empty_rejected"
    if chosen.strip() == rejected.strip():
        return "equal"
    return None


def describe_counts(counts: Counter) -> str:
    """'dropped_equal 1, kept 12': a count table on one line, keys sorted."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def usable_pairs(pairs: Sequence[PreferencePair]) -> tuple[list[PreferencePair], Counter]:
    """The pairs that teach a preference, and the counts of those dropped by ``pair_problem``."""
    kept, counts = [], Counter()
    for p in pairs:
        problem = pair_problem(p.chosen, p.rejected)
        if problem:
            counts[f"dropped_{problem}"] += 1
        else:
            kept.append(p)
    return kept, counts


def _gap_table(keys: list[str]) -> dict[str, float]:
    """g_k = r_k / max r, r_k = max(0, N / (K n_k) - 1): how under-represented key k is."""
    counts = Counter(keys)
    n, k = sum(counts.values()), len(counts)
    r = {key: max(0.0, n / (k * c) - 1.0) for key, c in counts.items()}
    top = max(r.values(), default=0.0)
    return {key: (v / top if top > 0 else 0.0) for key, v in r.items()}


def pair_weights(train_pairs: Sequence[PreferencePair],
                 pairs: Sequence[PreferencePair] | None = None) -> list[PreferencePair]:
    """The authors' hdpo_weight, with the gap tables from TRAIN pairs:

        clip(1 + 0.5 gap + 1.0 max(0, d_rej - d_cho) + 0.25 lang + 0.25 pair_bias, 0.5, 3.0)

    Missing critic distances count as 0. Returns ``pairs`` (default: the train pairs) reweighted.
    """
    gap = _gap_table([p.bucket_id for p in train_pairs])
    lang = _gap_table([p.record.language for p in train_pairs])
    out = []
    for p in (train_pairs if pairs is None else pairs):
        d = max(0.0, (p.rejected_dist or 0.0) - (p.chosen_dist or 0.0))
        w = (1 + 0.5 * gap.get(p.bucket_id, 0.0) + 1.0 * d + 0.25 * lang.get(p.record.language, 0.0)
             + 0.25 * PAIR_BIAS[p.pair_type])
        out.append(dataclasses.replace(p, weight=min(3.0, max(0.5, w))))
    return out
