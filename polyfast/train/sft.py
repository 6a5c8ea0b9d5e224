"""Bucket-Aware SFT: data preparation, the training loop, evaluation and checkpoints.

One optimizer step = ``grad_accum`` micro-batches (packs). The step's normaliser, the sum of the
examples' masses (w_b for bucket weighting), is known on the host from the packs before any forward,
so the loss is docs/method.md section 2 exactly whatever the micro-batch size, with no device sync.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import SFTConfig
from ..data import (Example, bucket_weights, collate, demo_records, encode_records, load_tokenizer,
                    pack_examples, packing_efficiency, read_records)
from ..data.packing import example_mass
from ..data.tokenize import fit_length
from ..errors import ConfigError
from ..losses import bucket_sft_loss, step_normalizer
from ..model import load_model, logit_softcap
from ..phases import phase
from ..tables import format_table
from .base import Trainer

log = logging.getLogger("polyfast")


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    weights: dict[str, float]
    bucket_names: list[str]
    counts: dict[str, Counter] = field(default_factory=dict)   # split -> what happened


def _records(source: str, split: str, cfg: SFTConfig):
    if source == "demo":
        return demo_records(split), None
    recs, report = read_records(source, skip_bad_rows=cfg.data.skip_bad_rows,
                                legacy_tokens=cfg.data.legacy_tokens, split=split)
    return recs, report


def _fit(examples: list[Example], cfg: SFTConfig) -> tuple[list[Example], Counter]:
    out, counts = [], Counter()
    for ex in examples:
        fitted = fit_length(ex, cfg.data.max_tokens, cfg.data.overlong)
        if fitted is None:
            counts["dropped_overlong"] += 1
            continue
        counts["truncated_prompt"] += bool(fitted.truncated)
        out.append(fitted)
    counts["kept"] = len(out)
    return out, counts


def prepare_data(cfg: SFTConfig, tokenizer) -> PreparedData:
    """Read, weight (TRAIN split only), tokenise and fit the train and val examples."""
    d = cfg.data
    train_recs, train_report = _records(d.train, "train", cfg)
    weights = bucket_weights(train_recs, power=d.weight_power, clip=d.weight_clip)
    train, c_train = _fit(encode_records(tokenizer, train_recs, system=d.system_prompt,
                                         weights=weights), cfg)
    if train_report is not None:
        c_train.update({f"skipped_rows[{k}]": v for k, v in train_report.skipped.items()})
    val, c_val = [], Counter()
    if d.val:
        val_recs, val_report = _records(d.val, "val", cfg)
        val, c_val = _fit(encode_records(tokenizer, val_recs, system=d.system_prompt,
                                         weights=weights), cfg)
        if val_report is not None:
            c_val.update({f"skipped_rows[{k}]": v for k, v in val_report.skipped.items()})
    if not train:
        raise ConfigError("data.max_tokens", f"no training example fits in {d.max_tokens} tokens")
    names = sorted({ex.bucket for ex in train} | {ex.bucket for ex in val})
    return PreparedData(train, val, weights, names, {"train": c_train, "val": c_val})


# ---------------------------------------------------------------------------------------------
# the trainer


class SFTTrainer(Trainer):
    """Bucket-Aware SFT: packs of examples, the step-normalised bucket-weighted loss."""

    name = "sft"

    data: PreparedData
    packed: bool                    # data.packing is not "none"
    softcap: float | None           # the policy's final-logit softcap (Gemma-2)

    def __init__(self, cfg: SFTConfig, data: PreparedData | None = None, tokenizer=None):
        self.data, self._given_tokenizer = data, tokenizer
        super().__init__(cfg)

    def load(self):
        cfg = self.cfg
        tokenizer = self._given_tokenizer or load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        self.data = self.data or prepare_data(cfg, tokenizer)
        self.packed = cfg.data.packing != "none"
        model = load_model(cfg.model, tokenizer, packed=self.packed, seed=cfg.seed,
                           device=self.device)
        self.softcap = logit_softcap(model)
        return tokenizer, model

    def make_packs(self, seed: int) -> list[list[Example]]:
        d = self.cfg.data
        return pack_examples(self.data.train, d.max_tokens, d.packing, batch_size=d.batch_size,
                             seed=seed)

    def batch(self, pack: list[Example], weighting: str | None = None):
        return collate(pack, self.data.bucket_names, weighting=weighting or self.cfg.data.weighting,
                       padded=not self.packed,
                       pad_id=self.tokenizer.pad_token_id or 0).to(self.device)

    # -- one micro-batch --------------------------------------------------------------------
    def micro_loss(self, batch, normalizer: float):
        def loss(hidden, weight):  # hidden (T, H), weight (V, H)
            return bucket_sft_loss(hidden, weight, batch.scored, normalizer, softcap=self.softcap,
                                   backend=self.cfg.train.loss_backend)
        return self.runner(batch, loss, self.autocast)

    def forward_backward(self, packs: list[list[Example]], step_packs=None) -> dict:
        """Forward/backward every micro-batch, each normalised by the step's total mass (over all
        ranks' packs), so the accumulated gradient is that of the step loss (``losses``)."""
        self.model.train()
        weighting = self.cfg.data.weighting
        normalizer = step_normalizer((ex for p in (step_packs or packs) for ex in p), weighting)
        index = {b: i for i, b in enumerate(self.data.bucket_names)}
        bucket_sum = torch.zeros(len(index), device=self.device)
        bucket_mass = torch.zeros(len(index))
        loss_total = torch.zeros((), device=self.device)
        for pack in packs:
            with phase("data"):
                batch = self.batch(pack)
            loss, per_token = self.micro_loss(batch, normalizer)
            with phase("backward"):
                (loss * self.grad_scale).backward()
            loss_total += loss.detach()
            bucket_sum.index_add_(0, batch.scored.buckets, per_token.detach())
            for ex in pack:
                bucket_mass[index[ex.bucket]] += example_mass(ex, weighting)
        return {"loss": loss_total, "bucket_sum": bucket_sum, "bucket_mass": bucket_mass}

    def train_row(self, out: dict) -> dict:
        names, mass, bsum = self.data.bucket_names, out["bucket_mass"], out["bucket_sum"].cpu()
        return {"bucket_loss": {names[i]: float(bsum[i] / mass[i])
                                for i in range(len(names)) if mass[i] > 0}}

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, examples: list[Example] | None = None) -> dict:
        """Per-bucket eval loss of the val examples (see ``per_bucket_loss``)."""
        examples = self.data.val if examples is None else examples
        return per_bucket_loss(self.model, examples, self.data.bucket_names, self.cfg.data.max_tokens,
                               backend=self.cfg.train.loss_backend, autocast=self.autocast,
                               packed=self.packed, batch_size=self.cfg.data.batch_size,
                               pad_id=self.tokenizer.pad_token_id or 0, runner=self.runner)

    def start_row(self) -> dict:
        return {"train_examples": len(self.data.train), "val_examples": len(self.data.val),
                "packs_per_epoch": len(self.packs(0)), "packing_efficiency": self.efficiency(),
                "bucket_weights": self.data.weights,
                "counts": {k: dict(v) for k, v in self.data.counts.items()}}

    def data_summary(self) -> str:
        d = self.cfg.data
        parts = [describe_split(split, c, d.max_tokens)
                 for split, c in self.data.counts.items() if c]
        return (f"{'; '.join(parts)}; {len(self.data.bucket_names)} buckets, "
                f"{len(self.packs(0))} packs per epoch (packing efficiency "
                f"{self.efficiency():.3f})")

    def efficiency(self) -> float:
        return packing_efficiency(self.packs(0), self.cfg.data.max_tokens, self.cfg.data.packing)

    def summary_extra(self) -> dict:
        return {"packing_efficiency": self.efficiency()}


@torch.no_grad()
def per_bucket_loss(model, examples: list[Example], bucket_names: list[str], max_tokens: int, *,
                    backend: str = "auto", autocast=None, packed: bool = True, batch_size: int = 4,
                    pad_id: int = 0, runner=None) -> dict:
    """The mean over each bucket's examples of their mean response-token CE; macro and mean too."""
    from ..model import TrunkHead
    if not examples:
        return {}
    runner = runner or TrunkHead(model)
    softcap = logit_softcap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    K = len(bucket_names)
    sums = torch.zeros(K, device=device)
    packs = pack_examples(examples, max_tokens, "mixed" if packed else "none", batch_size=batch_size)
    for pack in packs:
        batch = collate(pack, bucket_names, weighting="example", padded=not packed,
                        pad_id=pad_id).to(device)  # omega = 1 / T_i
        _, per_token = runner(batch, lambda h, w: bucket_sft_loss(
            h, w, batch.scored, 1.0, softcap=softcap, backend=backend), autocast)
        sums.index_add_(0, batch.scored.buckets, per_token.float())
    model.train(was_training)
    counts = Counter(ex.bucket for ex in examples)
    sums = sums.cpu().tolist()
    buckets = {b: sums[i] / counts[b] for i, b in enumerate(bucket_names) if counts[b]}
    return {"buckets": buckets, "macro": float(np.mean(list(buckets.values()))),
            "mean": sum(sums) / len(examples), "examples": len(examples)}


def describe_split(split: str, counts: Counter, max_tokens: int) -> str:
    """``train: 1,480 examples kept, 75 dropped (longer than 2048 tokens), 216 prompts cut from
    the left, 3 bad rows skipped``: what happened to one split's data."""
    out = [f"{split}: {counts.get('kept', 0):,} examples kept"]
    if counts.get("dropped_overlong"):
        out.append(f"{counts['dropped_overlong']:,} dropped (longer than {max_tokens} tokens)")
    if counts.get("truncated_prompt"):
        out.append(f"{counts['truncated_prompt']:,} prompts cut from the left to fit")
    skipped = sum(v for k, v in counts.items() if k.startswith("skipped_rows"))
    if skipped:
        out.append(f"{skipped:,} bad rows skipped")
    return ", ".join(out)


def eval_table(before: dict, after: dict) -> str:
    """Per-bucket eval loss before and after training."""
    rows = []
    for b in sorted(after.get("buckets", {})):
        x, y = before.get("buckets", {}).get(b, float("nan")), after["buckets"][b]
        rows.append([b, x, y, y - x])
    if before and after:
        rows.append(["macro", before["macro"], after["macro"], after["macro"] - before["macro"]])
    return format_table(["bucket", "before", "after", "change"], rows)

