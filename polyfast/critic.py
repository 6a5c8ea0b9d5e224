"""The critic's target: distance of a response to its bucket's human support (docs/method.md section 4).

Files read back: a references file (``References.load``: JSON, checked for its keys), a critic
directory (``MLPCritic.load``: ``critic.json`` as JSON, ``critic.safetensors`` as safetensors); a
file that is neither is a DataError naming it. Nothing in them can run code.

- ``text_features``: 34 language-aware text features (Han text counted by character), computed
  without downloaded data; ``lm_features``: log-prob statistics of a response under a scoring LM,
  with and without its prompt, from :func:`polyfast.kernels.joint_logprobs`.
- ``References``: per-bucket feature statistics (q10, q25, q50, q75, q90, mean, std, count) from
  TRAIN human responses only; a bucket with fewer than ``min_bucket_size`` records falls back to its
  ``language|track|family`` parent, then to its language.
- ``band_distance``: s_f = max(q90 - q10, std, floor_f); d_f = (q10 - x)/s_f below the band,
  (x - q90)/s_f above it, 0 inside; d = mean_f d_f. floor_f is the feature's spread over the
  language's human responses (``band_floor="language"``) or 1e-6 (``"authors"``).
- ``MLPCritic``: the authors' critic shape, [standardised features ; Emb64(bucket)] ->
  Linear-GELU-Dropout-Linear-GELU-Dropout-Linear, trained with mean|s - d| plus the pair margin
  mean relu(0.1 - s_rej + s_cho); saved as safetensors + JSON. (The authors fed a mean-pooled
  encoder embedding; polyfast feeds the text features, which need no extra model.)
- ``LMCritic``: a frozen LM whose mean response NLL is band-scored against the bucket's human NLL
  band; in HDPO its log-probs come from the same joint_logprobs call as the policy's.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .data import text as T
from .data.records import Record
from .errors import DataError
from .files import read_json, read_safetensors

# ---------------------------------------------------------------------------------------------
# text features

_TOKEN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\w\s]")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_SENT_END = re.compile(r"[.!?。！？]+|\n")
_ASCII_PUNCT = re.compile(r"[!-/:-@\[-`{-~]")
_FULL_PUNCT = re.compile(r"[\u3000-\u303f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u2014\u2026\u201c\u201d\u2018\u2019]")
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)、])\s+", re.M)
_HEADER = re.compile(r"^\s*#{1,6}\s", re.M)
_MARKUP = re.compile(r"\*\*|__|`|\[[^\]]*\]\(")

FEATURE_NAMES = (
    "n_chars", "n_tokens", "n_words", "n_han", "n_lines", "n_paragraphs", "n_sentences",
    "mean_sentence_tokens", "std_sentence_tokens", "max_sentence_tokens", "mean_word_chars",
    "type_token_ratio", "root_ttr", "distinct_1", "distinct_2", "distinct_3", "repeated_bigram_rate",
    "top_token_share", "token_entropy", "char_entropy", "ascii_punct", "fullwidth_punct",
    "punct_ratio", "commas_per_sentence", "questions", "exclamations", "digits", "digit_ratio",
    "uppercase_ratio", "long_word_ratio", "han_ratio", "list_items", "headers", "markup",
)


def _entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def _distinct(tokens: list[str], n: int) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_features(text: str) -> dict[str, float]:
    """The 34 features of FEATURE_NAMES for one response (Han characters count as tokens/words)."""
    norm = T.normalize_whitespace(text)
    tokens = _TOKEN.findall(norm)
    words = _WORD.findall(norm)
    lower = [t.lower() for t in tokens]
    sentences = [s for s in _SENT_END.split(norm) if s.strip()]
    sent_lens = [len(_TOKEN.findall(s)) for s in sentences] or [0]
    han = len(T.HAN.findall(norm))
    latin = [w for w in words if w.isascii()]
    letters = [c for c in norm if c.isalpha() and c.isascii()]
    digits = sum(c.isdigit() for c in norm)
    ascii_p, full_p = len(_ASCII_PUNCT.findall(norm)), len(_FULL_PUNCT.findall(norm))
    counts = Counter(lower)
    bigrams = [tuple(lower[i:i + 2]) for i in range(len(lower) - 1)]
    n_tok = max(len(tokens), 1)
    f = {
        "n_chars": len(norm), "n_tokens": len(tokens), "n_words": len(words), "n_han": han,
        "n_lines": norm.count("\n") + 1 if norm else 0,
        "n_paragraphs": len([p for p in norm.split("\n\n") if p.strip()]),
        "n_sentences": len(sentences),
        "mean_sentence_tokens": float(np.mean(sent_lens)), "std_sentence_tokens": float(np.std(sent_lens)),
        "max_sentence_tokens": float(max(sent_lens)),
        "mean_word_chars": float(np.mean([len(w) for w in words])) if words else 0.0,
        "type_token_ratio": len(counts) / n_tok, "root_ttr": len(counts) / math.sqrt(n_tok),
        "distinct_1": _distinct(lower, 1), "distinct_2": _distinct(lower, 2),
        "distinct_3": _distinct(lower, 3),
        "repeated_bigram_rate": (1 - len(set(bigrams)) / len(bigrams)) if bigrams else 0.0,
        "top_token_share": max(counts.values()) / n_tok if counts else 0.0,
        "token_entropy": _entropy(counts), "char_entropy": _entropy(Counter(norm.replace(" ", ""))),
        "ascii_punct": ascii_p, "fullwidth_punct": full_p,
        "punct_ratio": (ascii_p + full_p) / n_tok,
        "commas_per_sentence": (norm.count(",") + norm.count("，") + norm.count("、"))
        / max(len(sentences), 1),
        "questions": norm.count("?") + norm.count("？"),
        "exclamations": norm.count("!") + norm.count("！"),
        "digits": digits, "digit_ratio": digits / max(len(norm), 1),
        "uppercase_ratio": sum(c.isupper() for c in letters) / max(len(letters), 1),
        "long_word_ratio": sum(len(w) >= 7 for w in latin) / max(len(latin), 1),
        "han_ratio": han / max(len(norm), 1),
        "list_items": len(_LIST_ITEM.findall(norm)), "headers": len(_HEADER.findall(norm)),
        "markup": len(_MARKUP.findall(norm)),
    }
    return {k: float(f[k]) for k in FEATURE_NAMES}


def feature_matrix(texts: Iterable[str]) -> np.ndarray:
    """(n, 34) text features; (0, 34) for no texts."""
    rows = [list(text_features(t).values()) for t in texts]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(FEATURE_NAMES))


# ---------------------------------------------------------------------------------------------
# LM features (through joint_logprobs)

LM_FEATURE_NAMES = ("lm_logp_sum", "lm_logp_mean", "lm_surprisal_std", "lm_surprisal_min",
                    "lm_surprisal_max", "lm_noprompt_logp_sum", "lm_noprompt_logp_mean")


@torch.no_grad()
def response_logprobs(model, tokenizer, records: Sequence[Record], responses: Sequence[str] | None = None,
                      *, with_prompt: bool = True, system: str = "profile", max_tokens: int = 2048,
                      batch_tokens: int = 8192) -> list[np.ndarray]:
    """Per-token log-probs of each response (the record's, or ``responses``) under ``model``,
    after the record's prompt or after nothing but a start token. One packed forward per batch,
    log-probs from joint_logprobs; returns one float array per response."""
    import dataclasses

    from .data.packing import collate, pack_examples
    from .data.tokenize import Example, encode_record, fit_length
    from .kernels import joint_logprobs
    from .model import head_weight, hidden_states, logit_softcap, set_packed

    set_packed(model, True)
    device = next(model.parameters()).device
    examples = []
    for i, rec in enumerate(records):
        if responses is not None:
            rec = dataclasses.replace(rec, response=responses[i])
        ex = encode_record(tokenizer, rec, system=system)
        if not with_prompt:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ex = Example((start,) + ex.input_ids[ex.n_prompt:], 1, ex.bucket)
        ex = fit_length(ex, max_tokens)
        if ex is None:
            raise ValueError(f"record {rec.id}: the response alone exceeds {max_tokens} tokens")
        examples.append(dataclasses.replace(ex, record_id=str(i)))
    out: list[np.ndarray] = [np.zeros(0)] * len(examples)
    model_was_training = model.training
    model.eval()
    for pack in pack_examples(examples, batch_tokens, "mixed"):
        batch = collate(pack, sorted({e.bucket for e in pack})).to(device)
        h = hidden_states(model, batch)  # (T, H)
        labels = batch.labels[0]
        targets = torch.cat([labels[1:], labels.new_full((1,), -100)])
        seg = torch.full_like(targets, -1)
        for k, ex in enumerate(pack):  # segment k = the response tokens of example k
            s = int(batch.cu_seqlens[k])
            seg[s + ex.n_prompt - 1: s + len(ex) - 1] = k
        _, _, tok = joint_logprobs([h], [head_weight(model)], targets, seg, len(pack),
                                   softcaps=[logit_softcap(model)], return_token_logprobs=True)
        tok = tok[0].float().cpu().numpy()
        segs = seg.cpu().numpy()
        for k, ex in enumerate(pack):
            out[int(ex.record_id)] = tok[segs == k]
    model.train(model_was_training)
    return out


def lm_features(model, tokenizer, records: Sequence[Record], responses=None, **kw) -> np.ndarray:
    """(n, 7) LM features: log-prob sum and mean, surprisal std/min/max (with the prompt), and the
    log-prob sum and mean without it."""
    with_p = response_logprobs(model, tokenizer, records, responses, with_prompt=True, **kw)
    without = response_logprobs(model, tokenizer, records, responses, with_prompt=False, **kw)
    rows = []
    for a, b in zip(with_p, without):
        s = -a
        rows.append([a.sum(), a.mean(), s.std(), s.min(), s.max(), b.sum(), b.mean()])
    return np.array(rows, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# references and the band distance

STATS = ("q10", "q25", "q50", "q75", "q90", "mean", "std", "count")


def _quantile(sorted_x: np.ndarray, p: float) -> float:
    # the authors' quantile: sorted(x)[round((n - 1) p)]
    return float(sorted_x[int(round((len(sorted_x) - 1) * p))])


def _stats(x: np.ndarray) -> dict[str, list[float]]:
    # x: (n, F) -> per stat a list of F values
    xs = np.sort(x, axis=0)
    out = {f"q{int(p * 100)}": [_quantile(xs[:, j], p) for j in range(x.shape[1])]
           for p in (0.1, 0.25, 0.5, 0.75, 0.9)}
    out["mean"] = x.mean(0).tolist()
    out["std"] = x.std(0).tolist()  # population std
    out["count"] = [float(len(x))] * x.shape[1]
    return out


def parents(bucket: str) -> list[str]:
    """The bucket, then its language|track|family parent, then its language."""
    parts = bucket.split("|")
    return [bucket, "|".join(parts[:3]), parts[0]]


ALL = "*"          # the statistics key over every record (the last floor of the band scale)
BAND_FLOORS = ("language", "authors")


def spread(st: dict[str, list[float]]) -> np.ndarray:
    """A band's width per feature: max(q90 - q10, std)."""
    return np.maximum(np.asarray(st["q90"]) - np.asarray(st["q10"]), np.asarray(st["std"]))


@dataclass
class References:
    """Per-key feature statistics; keys are buckets, their parents, languages and ``ALL``.

    ``band_floor`` sets the smallest scale of the band distance. "language" (default): a
    feature's spread over the language's human responses (else over all of them, else 1), so a
    feature that is constant among one bucket's humans scores a deviation in the units it has
    across the language; "authors": 1e-6, the released code's floor, under which a feature
    constant in a bucket turns any deviation into a distance of 1e5 or more."""

    features: list[str]
    stats: dict[str, dict[str, list[float]]]
    min_bucket_size: int = 20
    band_floor: str = "language"

    def __post_init__(self):
        if self.band_floor not in BAND_FLOORS:
            raise ValueError(f"band_floor must be one of {', '.join(BAND_FLOORS)}, "
                             f"got {self.band_floor!r}")
        self._scales: dict[str, np.ndarray] = {}

    @classmethod
    def build(cls, records: Sequence[Record], values: np.ndarray, features: Sequence[str],
              min_bucket_size: int = 20, band_floor: str = "language") -> "References":
        """From TRAIN records and their (n, F) feature values. Refuses records of other splits."""
        leaked = [r.id for r in records if r.split not in ("", "train")]
        if leaked:
            raise ValueError(f"references must come from the TRAIN split only; got {len(leaked)} "
                             f"records of other splits (first: {leaked[0]})")
        groups = defaultdict(list)
        for i, r in enumerate(records):
            for key in parents(r.bucket_id):
                groups[key].append(i)
        groups[ALL] = list(range(len(records)))
        stats = {key: _stats(values[idx]) for key, idx in groups.items() if idx}
        return cls(list(features), stats, min_bucket_size, band_floor)

    def lookup(self, bucket: str) -> tuple[str, dict[str, list[float]]]:
        """The statistics for a bucket: its own when it has min_bucket_size records, else the
        first ancestor that has (the language as the last resort)."""
        chain = parents(bucket)
        for key in chain:
            st = self.stats.get(key)
            if st and st["count"][0] >= self.min_bucket_size:
                return key, st
        for key in reversed(chain):
            if key in self.stats:
                return key, self.stats[key]
        raise KeyError(f"no reference for bucket {bucket!r} (nor its language)")

    def scale(self, bucket: str) -> np.ndarray:
        """The band distance's per-feature scale for ``bucket``: its band's spread, floored
        (see ``band_floor``)."""
        if bucket not in self._scales:
            key, st = self.lookup(bucket)
            floor = np.full(len(self.features), 1e-6)
            if self.band_floor == "language":
                floor = np.ones(len(self.features))
                for k in (ALL, parents(key)[-1]):  # a wider key first, the language last wins
                    if k in self.stats:
                        s = spread(self.stats[k])
                        floor = np.where(s > 0, s, floor)
            self._scales[bucket] = np.maximum(spread(st), floor)
        return self._scales[bucket]

    def distance(self, values: np.ndarray, buckets: Sequence[str]) -> np.ndarray:
        """Band distance of each row of (n, F) values to its bucket's band; (n,)."""
        if values.shape[1] != len(self.features):
            raise ValueError(f"{values.shape[1]} feature values per row, but the references hold "
                             f"{len(self.features)} features ({self.features[-1]} last)")
        out = np.empty(len(buckets))
        for i, b in enumerate(buckets):
            out[i] = band_distance(values[i], self.lookup(b)[1], self.scale(b))
        return out

    def to_json(self) -> dict:
        return {"features": self.features, "min_bucket_size": self.min_bucket_size,
                "band_floor": self.band_floor, "stats": self.stats}

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> "References":
        """A references file (JSON, ``save``'s layout); DataError naming it otherwise."""
        what = "a references file (polyfast critic references)"
        d = read_json(path, what)
        ok = (isinstance(d, dict) and isinstance(d.get("features"), list)
              and all(isinstance(f, str) for f in d["features"])
              and isinstance(d.get("stats"), dict) and isinstance(d.get("min_bucket_size"), int)
              and d.get("band_floor", "language") in ("language", "authors")
              and all(isinstance(st, dict) and all(isinstance(v, list) for v in st.values())
                      for st in d["stats"].values()))
        if not ok:
            raise DataError(f"not {what}: expected an object with features, stats, "
                            "min_bucket_size and band_floor", path)
        return cls(d["features"], d["stats"], d["min_bucket_size"],
                   d.get("band_floor", "language"))


def band_distance(x: np.ndarray, st: dict[str, list[float]],
                  scale: np.ndarray | None = None) -> float:
    """mean_f of the distance outside [q10, q90] in units of ``scale`` (default: the authors'
    max(q90 - q10, std, 1e-6); ``References.scale`` gives the floored one)."""
    q10, q90 = np.asarray(st["q10"]), np.asarray(st["q90"])
    if scale is None:
        scale = np.maximum(spread(st), 1e-6)
    d = np.where(x < q10, (q10 - x) / scale, np.where(x > q90, (x - q90) / scale, 0.0))
    return float(d.mean())


def features(records: Sequence[Record], responses: Sequence[str] | None = None, *, model=None,
             tokenizer=None, **kw) -> tuple[np.ndarray, list[str]]:
    """(n, F) feature values of the records' responses (or ``responses`` in their contexts): the
    text features, plus the LM features when a scoring model is given."""
    texts = [r.response for r in records] if responses is None else list(responses)
    values, names = feature_matrix(texts), list(FEATURE_NAMES)
    if model is not None:
        values = np.hstack([values, lm_features(model, tokenizer, records, responses, **kw)])
        names += LM_FEATURE_NAMES
    return values, names


def text_references(records: Sequence[Record], min_bucket_size: int = 20,
                    band_floor: str = "language") -> References:
    return References.build(records, feature_matrix(r.response for r in records), FEATURE_NAMES,
                            min_bucket_size, band_floor)


def text_distance(refs: References, texts: Sequence[str], buckets: Sequence[str]) -> np.ndarray:
    return refs.distance(feature_matrix(texts), buckets)


# ---------------------------------------------------------------------------------------------
# the MLP critic


class MLPCritic(nn.Module):
    """[standardised features ; Emb64(bucket)] -> 256 -> 256 -> 1."""

    def __init__(self, n_features: int, buckets: Sequence[str], hidden: int = 256,
                 bucket_dim: int = 64, dropout: float = 0.1):
        super().__init__()
        self.buckets = list(buckets)
        self.embed = nn.Embedding(len(self.buckets) + 1, bucket_dim)  # last row: unknown bucket
        self.net = nn.Sequential(nn.Linear(n_features + bucket_dim, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def bucket_index(self, buckets: Sequence[str]) -> torch.Tensor:
        index = {b: i for i, b in enumerate(self.buckets)}
        return torch.tensor([index.get(b, len(self.buckets)) for b in buckets])

    def forward(self, x: torch.Tensor, bucket_idx: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std  # (n, F)
        return self.net(torch.cat([z, self.embed(bucket_idx)], -1))[:, 0]  # (n,)

    @torch.no_grad()
    def score(self, texts: Sequence[str], buckets: Sequence[str]) -> np.ndarray:
        self.eval()
        x = torch.tensor(feature_matrix(texts), dtype=torch.float32)
        return self(x, self.bucket_index(buckets)).numpy()

    def save(self, out_dir: str) -> None:
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  os.path.join(out_dir, "critic.safetensors"))
        with open(os.path.join(out_dir, "critic.json"), "w", encoding="utf-8") as f:
            json.dump({"kind": "mlp", "features": list(FEATURE_NAMES), "buckets": self.buckets,
                       "hidden": self.net[0].out_features, "bucket_dim": self.embed.embedding_dim},
                      f, ensure_ascii=False, indent=1)

    @classmethod
    def load(cls, out_dir: str) -> "MLPCritic":
        """A critic directory: critic.json (JSON) and critic.safetensors; DataError naming the
        file at fault otherwise."""
        what = "a critic (polyfast critic train)"
        path = os.path.join(out_dir, "critic.json")
        meta = read_json(path, what)
        ints = ("hidden", "bucket_dim")
        if not (isinstance(meta, dict) and meta.get("kind") == "mlp"
                and isinstance(meta.get("features"), list) and isinstance(meta.get("buckets"), list)
                and all(isinstance(meta.get(k), int) and meta[k] > 0 for k in ints)):
            raise DataError(f"not {what}: expected kind 'mlp', features, buckets, hidden and "
                            "bucket_dim", path)
        critic = cls(len(meta["features"]), meta["buckets"], meta["hidden"], meta["bucket_dim"])
        path = os.path.join(out_dir, "critic.safetensors")
        try:
            critic.load_state_dict(read_safetensors(path, what))
        except RuntimeError as e:  # missing, extra or mis-shaped tensors
            raise DataError(f"does not match critic.json ({str(e).splitlines()[0]})", path) from None
        return critic


def train_mlp_critic(records: Sequence[Record], pairs, refs: References, *, epochs: int = 3,
                     lr: float = 1e-3, batch_size: int = 16, pair_batch_size: int = 8,
                     margin: float = 0.1, seed: int = 0) -> tuple[MLPCritic, list[float]]:
    """Fit the critic to band distances (human responses and rejected ones) plus the pair margin.
    Returns the critic and the mean loss of each epoch."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    texts = [r.response for r in records] + [p.rejected for p in pairs]
    buckets = [r.bucket_id for r in records] + [p.bucket_id for p in pairs]
    x = torch.tensor(feature_matrix(texts), dtype=torch.float32)
    d = torch.tensor(refs.distance(x.double().numpy(), buckets), dtype=torch.float32)
    critic = MLPCritic(x.shape[1], sorted(set(buckets)))
    critic.mean.copy_(x.mean(0))
    critic.std.copy_(x.std(0).clamp(min=1e-6))
    b = critic.bucket_index(buckets)
    n_rec = len(records)
    cho = torch.tensor(feature_matrix(p.chosen for p in pairs), dtype=torch.float32)
    rej = x[n_rec:]
    pb = critic.bucket_index([p.bucket_id for p in pairs])
    opt = torch.optim.AdamW(critic.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        critic.train()
        order = torch.randperm(len(x), generator=g)
        pair_order = torch.randperm(len(pairs), generator=g)
        losses = []
        for k, s in enumerate(range(0, len(x), batch_size)):
            idx = order[s:s + batch_size]
            loss = (critic(x[idx], b[idx]) - d[idx]).abs().mean()
            if len(pairs):
                j = pair_order[(k * pair_batch_size) % len(pairs):][:pair_batch_size]
                gap = critic(rej[j], pb[j]) - critic(cho[j], pb[j])
                loss = loss + torch.relu(margin - gap).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
    critic.eval()
    return critic, history
