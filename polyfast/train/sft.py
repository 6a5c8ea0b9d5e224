"""Bucket-Aware SFT: data preparation, the training loop, evaluation and checkpoints.

One optimizer step = ``grad_accum`` micro-batches (packs). The step's normaliser, the sum of the
examples' masses (w_b for bucket weighting), is known on the host from the packs before any forward,
so the loss is METHOD.md section 2 exactly whatever the micro-batch size, with no device sync.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import SFTConfig, save_config
from ..data import (Example, bucket_weights, collate, demo_records, encode_records,
                    load_tokenizer, pack_examples, packing_efficiency, read_records)
from ..data.packing import example_mass
from ..data.tokenize import fit_length
from ..errors import ConfigError
from ..losses import bucket_sft_loss
from ..model import head_weight, hidden_states, load_model, logit_softcap, resolve_device
from .checkpoint import export_pretrained, list_checkpoints, load_checkpoint, save_checkpoint
from .metrics import MetricsLog, format_table
from .optim import build_optimizer, cosine_with_warmup

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


class SFTTrainer:
    """Owns model, optimizer, schedule and data order; ``train_step`` is one optimizer step."""

    def __init__(self, cfg: SFTConfig, data: PreparedData | None = None, tokenizer=None):
        self.cfg = cfg
        t = cfg.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.device = resolve_device(t.device)
        self.tokenizer = tokenizer or load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        self.data = data or prepare_data(cfg, self.tokenizer)
        self.packed = cfg.data.packing != "none"
        self.model = load_model(cfg.model, self.tokenizer, packed=self.packed,
                                seed=cfg.seed).to(self.device)
        self.softcap = logit_softcap(self.model)
        self._pack_cache: dict[int, list[list[Example]]] = {}
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, t.betas)
        if t.grad_accum < 1:
            raise ConfigError("train.grad_accum", "must be >= 1")
        self.steps_per_epoch = math.ceil(len(self._packs(0)) / t.grad_accum)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.scheduler = cosine_with_warmup(self.optimizer, self.total_steps,
                                            int(t.warmup_ratio * self.total_steps), t.min_lr_ratio)
        self.step = 0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if self.device.type == "cuda" and cfg.model.dtype == "auto"
                         else contextlib.nullcontext())

    # -- data order: a pure function of (seed, epoch), so resuming needs only the step ----------
    def _packs(self, epoch: int) -> list[list[Example]]:
        if epoch not in self._pack_cache:
            d = self.cfg.data
            self._pack_cache = {epoch: pack_examples(self.data.train, d.max_tokens, d.packing,
                                                     batch_size=d.batch_size,
                                                     seed=self.cfg.seed * 1000 + epoch)}
        return self._pack_cache[epoch]

    def step_packs(self, step: int) -> list[list[Example]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        ga = self.cfg.train.grad_accum
        return self._packs(epoch)[k * ga:(k + 1) * ga]

    def batch(self, pack: list[Example], weighting: str | None = None):
        return collate(pack, self.data.bucket_names, weighting=weighting or self.cfg.data.weighting,
                       padded=not self.packed,
                       pad_id=self.tokenizer.pad_token_id or 0).to(self.device)

    # -- one micro-batch --------------------------------------------------------------------
    def micro_loss(self, batch, normalizer: float):
        with self.autocast:
            hidden = hidden_states(self.model, batch)  # (B*T, H)
        weight = head_weight(self.model)
        return bucket_sft_loss(hidden, weight, batch.labels, batch.token_weights,
                               normalizer, softcap=self.softcap,
                               backend=self.cfg.train.loss_backend)

    def forward_backward(self, packs: list[list[Example]]) -> dict:
        """Forward/backward every micro-batch of a step, each normalised by the step's total mass,
        so the accumulated gradient is that of METHOD.md's step loss."""
        self.model.train()
        weighting = self.cfg.data.weighting
        normalizer = sum(example_mass(ex, weighting) for p in packs for ex in p)
        index = {b: i for i, b in enumerate(self.data.bucket_names)}
        bucket_sum = torch.zeros(len(index), device=self.device)
        bucket_mass = torch.zeros(len(index))
        loss_total = torch.zeros((), device=self.device)
        tokens = 0
        for pack in packs:
            batch = self.batch(pack)
            loss, per_token = self.micro_loss(batch, normalizer)
            loss.backward()
            loss_total += loss.detach()
            # per_token sits at the predicting position, which shares its example (and bucket)
            # with the target wherever per_token is non-zero
            bucket_sum.index_add_(0, batch.bucket_ids.clamp(min=0), per_token.detach())
            for ex in pack:
                bucket_mass[index[ex.bucket]] += example_mass(ex, weighting)
            tokens += batch.num_tokens
        return {"loss": loss_total, "bucket_sum": bucket_sum, "bucket_mass": bucket_mass,
                "tokens": tokens}

    def train_step(self, packs: list[list[Example]]) -> dict:
        """One optimizer step: forward_backward, gradient clipping, update, schedule."""
        out = self.forward_backward(packs)
        clip = self.cfg.train.grad_clip
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                          clip if clip else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return out

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, examples: list[Example] | None = None) -> dict:
        """Per-bucket eval loss: the mean over a bucket's examples of their mean token CE."""
        examples = self.data.val if examples is None else examples
        if not examples:
            return {}
        self.model.eval()
        d = self.cfg.data
        K = len(self.data.bucket_names)
        sums = torch.zeros(K, device=self.device)
        for pack in pack_examples(examples, d.max_tokens, d.packing, batch_size=d.batch_size):
            batch = self.batch(pack, weighting="example")  # omega = 1 / T_i
            _, per_token = self.micro_loss(batch, 1.0)
            sums.index_add_(0, batch.bucket_ids.clamp(min=0), per_token.float())
        counts = Counter(ex.bucket for ex in examples)
        sums = sums.cpu().tolist()
        buckets = {b: sums[i] / counts[b] for i, b in enumerate(self.data.bucket_names) if counts[b]}
        return {"buckets": buckets, "macro": float(np.mean(list(buckets.values()))),
                "mean": sum(sums) / len(examples), "examples": len(examples)}

    # -- checkpoints --------------------------------------------------------------------------
    def save(self) -> str:
        return save_checkpoint(self.cfg.run_dir, self.step, self.model, self.optimizer,
                               self.scheduler, {"total_steps": self.total_steps},
                               keep=self.cfg.train.keep_checkpoints)

    def resume(self) -> bool:
        ckpts = list_checkpoints(self.cfg.run_dir)
        if not ckpts:
            return False
        state = load_checkpoint(ckpts[-1], self.model, self.optimizer, self.scheduler)
        if state.get("total_steps") != self.total_steps:
            raise ConfigError("train", f"checkpoint {ckpts[-1]} was made for "
                              f"{state.get('total_steps')} steps, this config makes {self.total_steps}")
        self.step = state["step"]
        return True

    # -- the run ------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        resumed = t.resume and self.resume()
        if not resumed:
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
        metrics = MetricsLog(cfg.run_dir, resume=resumed)
        names = self.data.bucket_names
        packs0 = self._packs(0)
        eff = packing_efficiency(packs0, cfg.data.max_tokens, cfg.data.packing)
        if not resumed:
            metrics.write({"event": "data", "train_examples": len(self.data.train),
                           "val_examples": len(self.data.val), "packs_per_epoch": len(packs0),
                           "packing_efficiency": eff, "bucket_weights": self.data.weights,
                           "counts": {k: dict(v) for k, v in self.data.counts.items()}})
        eval_before = self.evaluate() if not resumed else {}
        if eval_before:
            metrics.write({"event": "eval", "step": self.step, **eval_before})
        bar = tqdm(total=self.total_steps, initial=self.step, desc="sft", unit="step",
                   disable=not t.progress, dynamic_ncols=True)
        tokens = 0
        t0 = time.perf_counter()
        last = {}
        while self.step < self.total_steps:
            out = self.train_step(self.step_packs(self.step))
            tokens += out["tokens"]
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - t0
                mass = out["bucket_mass"]
                bsum = out["bucket_sum"].cpu()
                last = {"event": "train", "step": self.step, "loss": out["loss"].item(),
                        "grad_norm": float(out["grad_norm"]),
                        "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens / elapsed,
                        "bucket_loss": {names[i]: float(bsum[i] / mass[i])
                                        for i in range(len(names)) if mass[i] > 0}}
                metrics.write(last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:,.0f}")
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                metrics.write({"event": "eval", "step": self.step, **self.evaluate()})
            if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                self.save()
            bar.update(1)
        bar.close()
        train_time = time.perf_counter() - t0
        eval_after = self.evaluate()
        if eval_after:
            metrics.write({"event": "eval", "step": self.step, **eval_after})
        export = export_pretrained(self.model, self.tokenizer, os.path.join(cfg.run_dir, "final"))
        summary = {"event": "summary", "steps": self.step, "train_seconds": train_time,
                   "tokens": tokens, "tokens_per_s": tokens / max(train_time, 1e-9),
                   "packing_efficiency": eff, "final_loss": last.get("loss"), "export": export}
        metrics.write(summary)
        return {"summary": summary, "eval_before": eval_before, "eval_after": eval_after}


def eval_table(before: dict, after: dict) -> str:
    """Per-bucket eval loss before and after training."""
    rows = []
    for b in sorted(after.get("buckets", {})):
        x, y = before.get("buckets", {}).get(b, float("nan")), after["buckets"][b]
        rows.append([b, x, y, y - x])
    if before and after:
        rows.append(["macro", before["macro"], after["macro"], after["macro"] - before["macro"]])
    return format_table(["bucket", "before", "after", "change"], rows)


def run_sft(cfg: SFTConfig) -> dict:
    return SFTTrainer(cfg).fit()
