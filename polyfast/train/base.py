"""What every polyfast trainer shares: device, optimizer and schedule, a data order that is a pure
function of (seed, epoch) (so resuming needs only the step), the step loop with logging, periodic
evaluation and atomic checkpoints, and the final Hugging Face export. Subclasses say what a pack is
(``make_packs``), what a step computes (``forward_backward``) and how to evaluate."""

from __future__ import annotations

import functools
import math
import os
import random
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import save_config
from ..errors import ConfigError
from ..model import TrunkHead, autocast_context, resolve_device, set_tf32
from .checkpoint import (export_pretrained, list_checkpoints, load_checkpoint, save_checkpoint,
                         trainer_state)
from .distributed import all_reduce_sum, full_state_dict, init_distributed, shard_model
from .metrics import MetricsLog
from .optim import build_optimizer, cosine_with_warmup


class Trainer:
    name = "train"

    def __init__(self, cfg, tokenizer, model):
        """``cfg`` has ``run_dir``, ``seed``, ``model`` and ``train``; ``model`` is the policy
        (``setup_device`` has run). Under torchrun the policy is sharded with FSDP2 here."""
        self.cfg = cfg
        t = cfg.train
        if t.grad_accum < 1:
            raise ConfigError("train.grad_accum", "must be >= 1")
        self.tokenizer = tokenizer
        self.grad_scale = 1.0
        self.runner = TrunkHead(model)  # trunk + loss in one forward (what FSDP2 shards)
        if self.dist.enabled:
            shard_model(self.runner, self.device, cfg.model.dtype == "auto")
            self.grad_scale = float(self.dist.world)  # FSDP averages; the step loss is a sum
        self.model = model
        self._pack_cache: dict[int, list] = {}
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, t.betas)
        self.steps_per_epoch = math.ceil(len(self._packs(0)) / (t.grad_accum * self.dist.world))
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.scheduler = cosine_with_warmup(self.optimizer, self.total_steps,
                                            int(t.warmup_ratio * self.total_steps), t.min_lr_ratio)
        self.step = 0
        # a factory of fresh autocast contexts (bf16 for model.dtype auto on CUDA)
        self.autocast = functools.partial(autocast_context, cfg.model, self.device)

    def setup_device(self, train_cfg) -> torch.device:
        """Threads, device and (under torchrun) the process group; sets ``self.dist``."""
        if train_cfg.num_threads:
            torch.set_num_threads(train_cfg.num_threads)
        set_tf32(train_cfg.tf32)
        self.dist, device = init_distributed(resolve_device(train_cfg.device))
        return device

    # -- to be provided ---------------------------------------------------------------------
    def make_packs(self, seed: int) -> list:
        raise NotImplementedError

    def forward_backward(self, packs: list, step_packs: list | None = None) -> dict:
        """Accumulate this rank's gradients for ``packs``, normalised by the totals of
        ``step_packs`` (all ranks' packs of the step; default ``packs``); return at least
        {"loss": tensor} (``train_step`` adds the step's token count)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        return {}

    def start_row(self) -> dict:
        """The metrics row written once before training."""
        return {}

    def train_row(self, out: dict) -> dict:
        return {}

    # -- data order ---------------------------------------------------------------------------
    def _packs(self, epoch: int) -> list:
        if epoch not in self._pack_cache:
            self._pack_cache = {epoch: self.make_packs(self.cfg.seed * 1000 + epoch)}
        return self._pack_cache[epoch]

    def step_packs(self, step: int) -> list:
        """All ranks' packs of a step (grad_accum per rank)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        n = self.cfg.train.grad_accum * self.dist.world
        return self._packs(epoch)[k * n:(k + 1) * n]

    # -- one optimizer step -----------------------------------------------------------------
    def train_step(self, packs: list) -> dict:
        """forward_backward of this rank's share, gradient clipping, update, schedule."""
        out = self.forward_backward(packs[self.dist.rank::self.dist.world], packs)
        out["tokens"] = sum(len(x) for p in packs for x in p)  # all ranks' tokens, on the host
        if self.dist.enabled:  # the step's loss over all ranks (a collective, not a host sync)
            out["loss"] = all_reduce_sum(out["loss"], self.dist)
        clip = self.cfg.train.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
        out["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return out

    # -- checkpoints --------------------------------------------------------------------------
    def save(self) -> str:
        return save_checkpoint(self.cfg.run_dir, self.step, self.runner, self.optimizer,
                               self.scheduler, {"total_steps": self.total_steps,
                                                "grad_accum": self.cfg.train.grad_accum},
                               keep=self.cfg.train.keep_checkpoints,
                               also=(lambda tmp: self.export(os.path.join(tmp, "hf")))
                               if self.cfg.train.checkpoint_hf else None)

    def resume(self) -> bool:
        ckpts = list_checkpoints(self.cfg.run_dir)
        if not ckpts:
            return False
        state = trainer_state(ckpts[-1])
        if state.get("total_steps") != self.total_steps:
            packs = state.get("world_size", 1) * state.get("grad_accum", self.cfg.train.grad_accum)
            raise ConfigError("train", f"checkpoint {ckpts[-1]} was made for "
                              f"{state.get('total_steps')} steps, this config makes {self.total_steps}; "
                              f"a step there held {packs} packs (processes x train.grad_accum), "
                              f"here {self.dist.world * self.cfg.train.grad_accum}")
        load_checkpoint(ckpts[-1], self.runner, self.optimizer, self.scheduler)
        self.step = state["step"]
        return True

    # -- the run ------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        main = self.dist.main
        os.makedirs(cfg.run_dir, exist_ok=True)
        if main:
            save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        resumed = t.resume and self.resume()
        if not resumed:
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
        metrics = MetricsLog(cfg.run_dir, resume=resumed, enabled=main)
        if not resumed:
            metrics.write({"event": "data", **self.start_row()})
        eval_before = self.evaluate() if not resumed else {}
        if eval_before:
            metrics.write({"event": "eval", "step": self.step, **eval_before})
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, unit="step",
                   disable=not (t.progress and main), dynamic_ncols=True)
        tokens = 0
        t0 = time.perf_counter()
        last: dict = {}
        while self.step < self.total_steps:
            out = self.train_step(self.step_packs(self.step))
            tokens += out["tokens"]
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                last = {"event": "train", "step": self.step, "loss": out["loss"].item(),
                        "grad_norm": float(out["grad_norm"]), "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": tokens / (time.perf_counter() - t0), **self.train_row(out)}
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
        export = self.export(os.path.join(cfg.run_dir, "final"))
        summary = {"event": "summary", "steps": self.step, "train_seconds": train_time,
                   "tokens": tokens, "tokens_per_s": tokens / max(train_time, 1e-9),
                   "final_loss": last.get("loss"), "export": export, **self.summary_extra()}
        metrics.write(summary)
        return {"summary": summary, "eval_before": eval_before, "eval_after": eval_after}

    def summary_extra(self) -> dict:
        return {}

    def export(self, out_dir: str) -> str:
        """save_pretrained + tokenizer; a sharded policy is gathered and written by rank 0."""
        if not self.dist.enabled:
            return export_pretrained(self.model, self.tokenizer, out_dir)
        sd = full_state_dict(self.runner, self.dist)
        if self.dist.main:
            from transformers import AutoModelForCausalLM
            plain = AutoModelForCausalLM.from_config(self.model.config)
            plain.load_state_dict({k.removeprefix("lm."): v for k, v in sd.items()})
            export_pretrained(plain, self.tokenizer, out_dir)
        torch.distributed.barrier()
        return out_dir
