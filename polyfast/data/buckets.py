"""Bucket weights of Bucket-Aware SFT (docs/method.md section 2), computed over the TRAIN split."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from .records import Record


def bucket_counts(records: Iterable[Record]) -> Counter:
    return Counter(r.bucket_id for r in records)


def bucket_weights(records: Iterable[Record], power: float = 1.0,
                   clip: float | None = None) -> dict[str, float]:
    """Per-bucket weights ``w_b = c * n_b ** -power`` with ``c`` chosen so that the mean weight over
    records is 1; at ``power=1`` this is ``N / (K * n_b)``, at ``power=0`` every weight is 1.

    ``clip`` caps each weight at ``clip`` (after normalisation; the trainer divides by the step's sum
    of weights, so a cap needs no renormalisation). Pass the TRAIN records only.
    """
    counts = bucket_counts(records)
    if not counts:
        raise ValueError("bucket_weights needs at least one record")
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    n = sum(counts.values())
    scale = n / sum(c ** (1.0 - power) for c in counts.values())
    weights = {b: scale * c ** -power for b, c in sorted(counts.items())}
    if clip is not None:
        weights = {b: min(w, clip) for b, w in weights.items()}
    return weights
