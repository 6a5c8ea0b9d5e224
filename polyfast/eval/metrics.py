"""Per-bucket evaluation metrics (docs/method.md section 6), language-aware.

Text is tokenised for utility metrics with the SQuAD normalisation (lower case, no punctuation, no
English articles, single spaces) and, unlike the authors' whitespace split, with every Han
character its own token, so Chinese answers are not scored as one token.

- utility: exact match, token F1 (SQuAD), ROUGE-L F1 (LCS);
- diversity: distinct-1/2/3 over a corpus, self-BLEU-4 (each of a seeded sample against the rest);
- distribution: BNG = mean_f W1(gen_f, hum_f) / std(hum_f) per bucket against the TRAIN human
  features (features constant among the humans are left out and counted); HCR = share of
  generations inside the [q10, q90] band of every feature, and the in-band share per feature
  (and its mean over features); mean band distance to the bucket's human support; length-bin
  agreement and W1 of response lengths;
- TDM (multi-turn buckets): length ratio to the user turn and TF-IDF/SVD cosine coupling with it,
  each compared with the humans' by W1 / std, averaged;
- C-MAUVE (optional, evaluate.py): MAUVE per bucket in a local featuriser LM's embedding space.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from typing import Sequence

import numpy as np
from scipy.stats import wasserstein_distance

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | set("，。！？；：、（）《》“”‘’【】…—")


def eval_tokens(text: str) -> list[str]:
    """SQuAD-normalised tokens with each Han character separate."""
    text = "".join(c for c in text.lower() if c not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    text = _HAN.sub(lambda m: f" {m.group(0)} ", text)
    return text.split()


def exact_match(pred: str, ref: str) -> float:
    return float(eval_tokens(pred) == eval_tokens(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = eval_tokens(pred), eval_tokens(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    p, r = eval_tokens(pred), eval_tokens(ref)
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over the corpus."""
    grams = [tuple(t[i:i + n]) for t in map(eval_tokens, texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu4(hyp: list[str], refs: list[list[str]]) -> float:
    """Sentence BLEU-4 with multiple references: clipped n-gram precisions, add-one smoothing for
    n > 1 (Lin and Och), brevity penalty against the closest reference length."""
    if not hyp:
        return 0.0
    log_p = 0.0
    for n in range(1, 5):
        h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        if not h:
            matched, total = 0, 0
        else:
            best = Counter()
            for r in refs:
                best |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matched, total = sum((h & best).values()), sum(h.values())
        if n == 1:
            if matched == 0:
                return 0.0
            log_p += math.log(matched / total)
        else:
            log_p += math.log((matched + 1) / (total + 1))
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > closest else math.exp(1 - closest / len(hyp))
    return bp * math.exp(log_p / 4)


def self_bleu4(texts: Sequence[str], sample: int = 200, seed: int = 0) -> float:
    """Mean BLEU-4 of up to ``sample`` texts (seeded) against all the others."""
    toks = [eval_tokens(t) for t in texts]
    if len(toks) < 2:
        return 0.0
    idx = list(range(len(toks)))
    if len(idx) > sample:
        idx = random.Random(seed).sample(idx, sample)
    return float(np.mean([bleu4(toks[i], toks[:i] + toks[i + 1:]) for i in idx]))


def w1(a: Sequence[float], b: Sequence[float]) -> float:
    return float(wasserstein_distance(a, b)) if len(a) and len(b) else float("nan")


def bng(gen: np.ndarray, hum: np.ndarray) -> tuple[float, int]:
    """mean_f W1(gen_f, hum_f) / std(hum_f) over the features the humans vary on; (BNG, features
    left out because their human std is 0)."""
    std = hum.std(0)
    keep = std > 0
    if not keep.any():
        return float("nan"), int((~keep).sum())
    vals = [w1(gen[:, j], hum[:, j]) / std[j] for j in np.flatnonzero(keep)]
    return float(np.mean(vals)), int((~keep).sum())


def hcr(gen: np.ndarray, q10: np.ndarray, q90: np.ndarray) -> float:
    """Share of rows inside [q10, q90] on every feature."""
    if len(gen) == 0:
        return float("nan")
    return float(((gen >= q10) & (gen <= q90)).all(1).mean())


def in_band_by_feature(gen: np.ndarray, q10: np.ndarray, q90: np.ndarray) -> list[float]:
    """Per feature, the share of rows inside its [q10, q90] band."""
    if len(gen) == 0:
        return [float("nan")] * len(q10)
    return ((gen >= q10) & (gen <= q90)).mean(0).tolist()


def in_band(gen: np.ndarray, q10: np.ndarray, q90: np.ndarray) -> float:
    """The per-feature in-band share averaged over features: informative where the strict HCR
    (every feature at once) is 0."""
    return float(np.mean(in_band_by_feature(gen, q10, q90)))


def w1_over_std(gen: Sequence[float], hum: Sequence[float]) -> float:
    s = float(np.std(hum))
    return w1(gen, hum) / s if s > 0 else float("nan")
