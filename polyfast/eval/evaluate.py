"""Evaluate predictions per bucket (see metrics.py) and write metrics.json, report.md and plots.

Human-side statistics (feature bands, BNG samples, the TF-IDF/SVD space of TDM) come from the TRAIN
records only; the test records give the gold answers. Predictions are aligned to records by id: a
missing or an extra id is an error that names it. Files read back: records and predictions (JSON,
see ``data.records`` and ``generate``), references and critics (``critic``), and for ``compare``
each run's ``metrics.json`` (JSON, checked for its buckets).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from ..critic import feature_matrix, parents, text_references
from ..data import length_bin, token_count
from ..data.records import Record
from ..errors import DataError
from ..files import read_json
from . import metrics as M

PROFILES = ("oracle", "prior", "none")
SUMMARY_KEYS = ("f1", "rouge_l", "exact_match", "distinct_1", "distinct_2", "distinct_3",
                "self_bleu4", "bng", "hcr", "in_band", "distance", "bin_agreement", "length_w1",
                "tdm", "c_mauve", "empty")


def align(records: Sequence[Record], predictions: dict[str, str], source: str = "predictions",
          subset: bool = False) -> list[str]:
    """The predictions in record order; DataError naming the first missing or extra id (extra
    ids are fine when ``records`` is a subset of what was generated for)."""
    ids = [r.id for r in records]
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise DataError(f"no prediction for record id {missing[0]!r} ({len(missing)} missing)", source)
    extra = sorted(set(predictions) - set(ids))
    if extra and not subset:
        raise DataError(f"prediction id {extra[0]!r} is not in the test records ({len(extra)} extra)",
                        source)
    return [predictions[i] for i in ids]


def prior_records(records: Sequence[Record], train: Sequence[Record], seed: int = 0) -> list[Record]:
    """Records whose length bin is drawn (seeded) from the TRAIN distribution of their
    language|track|family: what a deployed model can know, unlike the gold bin (oracle)."""
    dist = defaultdict(Counter)
    for r in train:
        dist[parents(r.bucket_id)[1]][r.length_bin] += 1
    rng = random.Random(seed)
    out = []
    for r in records:
        c = dist.get(parents(r.bucket_id)[1]) or Counter(x.length_bin for x in train
                                                          if x.language == r.language)
        bins, weights = zip(*sorted(c.items()))
        out.append(dataclasses.replace(r, length_bin=rng.choices(bins, weights)[0]))
    return out


def _tdm_space(train: Sequence[Record]):
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [t for r in train if r.track == "multi" for t in (r.prompt, r.response)]
    if len(texts) < 4:
        return None
    vec = TfidfVectorizer(tokenizer=M.eval_tokens, lowercase=False, token_pattern=None)
    X = vec.fit_transform(texts)
    svd = TruncatedSVD(n_components=max(1, min(64, X.shape[1] - 1, len(texts) - 1)), random_state=0)
    svd.fit(X)
    return vec, svd


def _coupling(space, users: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    vec, svd = space
    u = svd.transform(vec.transform(users))
    r = svd.transform(vec.transform(responses))
    norm = np.linalg.norm(u, axis=1) * np.linalg.norm(r, axis=1)
    return np.where(norm > 0, (u * r).sum(1) / np.maximum(norm, 1e-12), 0.0)


def featurize(texts: Sequence[str], model, tokenizer, batch_size: int = 16,
              max_tokens: int = 512) -> np.ndarray:
    """Mean-pooled last hidden states of a (local) featuriser LM: (n, H) float64."""
    import torch
    from ..model import set_packed

    set_packed(model, False)
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] or
                   [tokenizer.eos_token_id] for t in texts[s:s + batch_size]]
            L = max(map(len, ids))
            pad = tokenizer.pad_token_id or 0
            x = torch.tensor([i + [pad] * (L - len(i)) for i in ids], device=device)
            mask = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids], device=device)
            h = model.model(input_ids=x, attention_mask=mask).last_hidden_state.float()
            out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).double().cpu())
    return torch.cat(out).numpy()


def c_mauve(gen_feats: np.ndarray, hum_feats: np.ndarray, seed: int = 0) -> float:
    """MAUVE between one bucket's generations and its human responses (mauve-text)."""
    import mauve
    n = min(len(gen_feats), len(hum_feats))
    out = mauve.compute_mauve(p_features=gen_feats, q_features=hum_feats,
                              num_buckets=max(2, n // 5), seed=seed, verbose=False)
    return float(out.mauve)


def mauve_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("mauve") is not None


def _empty(text: str) -> bool:
    return not text.strip()


def _utility(metric, pairs: list[tuple[str, str]]) -> float:
    """The mean of ``metric(prediction, gold)`` over the pairs; NaN for none."""
    return float(np.mean([metric(x, y) for x, y in pairs])) if pairs else float("nan")


def stratified_subset(records: Sequence[Record], n: int, seed: int = 0) -> list[Record]:
    """``n`` records drawn (seeded) with every bucket in proportion to its size, each bucket
    represented while ``n`` allows; in the records' order."""
    if n <= 0 or n >= len(records):
        return list(records)
    by_bucket = defaultdict(list)
    for i, r in enumerate(records):
        by_bucket[r.bucket_id].append(i)
    rng = random.Random(seed)
    keyed = []  # the j-th draw of a bucket of size m ranks at j / m: the first of every bucket first
    for _, ix in sorted(by_bucket.items()):
        ix = rng.sample(ix, len(ix))
        keyed += [(j / len(ix), rng.random(), i) for j, i in enumerate(ix)]
    return [records[i] for i in sorted(i for *_, i in sorted(keyed)[:n])]


def evaluate(records: Sequence[Record], preds: Sequence[str], train: Sequence[Record], *,
             seed: int = 0, self_bleu_sample: int = 100, featurizer=None,
             band_floor: str = "language") -> dict:
    """Per-bucket metrics, with macro (mean over buckets) and weighted (by count) summaries.

    Exact match, F1 and ROUGE-L leave out records whose gold answer is empty (counted as
    ``empty_references``): an empty generation would match them. ``empty`` is the share of empty
    (whitespace-only) generations, ``human_empty`` that of the bucket's TRAIN humans.
    ``featurizer`` = (model, tokenizer) adds C-MAUVE (needs mauve-text): MAUVE per bucket between
    the generations and the bucket's TRAIN human responses in the featuriser's embedding space.
    """
    refs = text_references(train, band_floor=band_floor)
    train_feats = feature_matrix(r.response for r in train)
    gen_feats = feature_matrix(preds)
    distances = refs.distance(gen_feats, [r.bucket_id for r in records])
    space = _tdm_space(train)
    by_bucket = defaultdict(list)
    for i, r in enumerate(records):
        by_bucket[r.bucket_id].append(i)
    out = {}
    for b in sorted(by_bucket):
        idx = by_bucket[b]
        recs = [records[i] for i in idx]
        p = [preds[i] for i in idx]
        key, st = refs.lookup(b)
        hum_idx = [j for j, r in enumerate(train) if key in parents(r.bucket_id)]
        bng, left_out = M.bng(gen_feats[idx], train_feats[hum_idx])
        gen_len = [token_count(x) for x in p]
        hum_len = [token_count(r.response) for r in recs]
        scored = [(x, r.response) for x, r in zip(p, recs) if not _empty(r.response)]
        q10, q90 = np.array(st["q10"]), np.array(st["q90"])
        row = {
            "n": len(idx),
            "empty": float(np.mean([_empty(x) for x in p])),
            "human_empty": float(np.mean([_empty(train[j].response) for j in hum_idx])),
            "empty_references": len(p) - len(scored),
            "exact_match": _utility(M.exact_match, scored), "f1": _utility(M.token_f1, scored),
            "rouge_l": _utility(M.rouge_l, scored),
            "distinct_1": M.distinct_n(p, 1), "distinct_2": M.distinct_n(p, 2),
            "distinct_3": M.distinct_n(p, 3),
            "self_bleu4": M.self_bleu4(p, self_bleu_sample, seed),
            "bng": bng, "bng_features_left_out": left_out,
            "hcr": M.hcr(gen_feats[idx], q10, q90),
            "in_band": M.in_band(gen_feats[idx], q10, q90),
            "in_band_by_feature": dict(zip(refs.features,
                                           M.in_band_by_feature(gen_feats[idx], q10, q90))),
            "distance": float(np.mean(distances[idx])), "reference_key": key,
            "bin_agreement": float(np.mean([length_bin(n) == r.length_bin
                                            for n, r in zip(gen_len, recs)])),
            "length_w1": M.w1(gen_len, hum_len),
            "gen_lengths": gen_len, "human_lengths": hum_len,
        }
        if featurizer is not None:
            hum_texts = [train[j].response for j in hum_idx]
            row["c_mauve"] = c_mauve(featurize(p, *featurizer), featurize(hum_texts, *featurizer),
                                     seed)
        if recs[0].track == "multi" and space is not None:
            users = [r.prompt for r in recs]
            ratio = lambda xs: [token_count(x) / max(token_count(u), 1) for x, u in zip(xs, users)]  # noqa: E731
            hum = [r.response for r in recs]
            parts = [M.w1_over_std(ratio(p), ratio(hum)),
                     M.w1_over_std(_coupling(space, users, p), _coupling(space, users, hum))]
            parts = [x for x in parts if not np.isnan(x)]
            row["tdm"] = float(np.mean(parts)) if parts else float("nan")
        out[b] = row
    return {"buckets": out, "macro": _summary(out, weighted=False),
            "weighted": _summary(out, weighted=True), "n": len(records)}


def _summary(buckets: dict, weighted: bool) -> dict:
    res = {}
    for k in SUMMARY_KEYS:
        vals = [(v[k], v["n"]) for v in buckets.values() if k in v and not np.isnan(v[k])]
        if vals:
            x, w = np.array(vals).T
            res[k] = float((x * w).sum() / w.sum()) if weighted else float(x.mean())
    return res


def write_report(result: dict, out_dir: str, title: str, profile: str) -> None:
    """metrics.json, report.md and the PNG plots of one evaluated model."""
    from .report import plot_bng_hcr, plot_lengths, report_markdown

    os.makedirs(out_dir, exist_ok=True)
    result = {**result, "title": title, "profile": profile}
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    plot_lengths(result, os.path.join(out_dir, "lengths.png"))
    plot_bng_hcr([result], os.path.join(out_dir, "bng_hcr.png"))
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(report_markdown([result]))


def compare(metric_files: Sequence[str], out_dir: str) -> str:
    """Runs side by side: report.md and bng_hcr.png over several metrics.json files."""
    from .report import plot_bng_hcr, report_markdown

    results = []
    for path in metric_files:
        if os.path.isdir(path):
            path = os.path.join(path, "metrics.json")
        if not os.path.exists(path):
            raise DataError("no metrics.json here (run polyfast eval first)", path)
        result = read_json(path, "an evaluation's metrics.json")
        if not (isinstance(result, dict) and isinstance(result.get("buckets"), dict)
                and isinstance(result.get("macro"), dict)):
            raise DataError("not an evaluation's metrics.json: no buckets and macro", path)
        results.append(result)
    os.makedirs(out_dir, exist_ok=True)
    plot_bng_hcr(results, os.path.join(out_dir, "bng_hcr.png"))
    text = report_markdown(results)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text
