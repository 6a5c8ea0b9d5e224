"""What every polyfast trainer shares: device, optimizer and schedule, a data order that is a pure
function of (seed, epoch) (so resuming needs only the step), the step loop with logging, periodic
evaluation and atomic checkpoints, and the final Hugging Face export. Subclasses say what they
train (``load``: the tokenizer and the policy, on ``self.device``), what a pack is
(``make_packs``), what a step computes (``forward_backward``) and how to evaluate.

A run has three levels: ``fit`` (the run: lock, run directory, evaluation, the step loop, export)
-> ``train_step`` (one optimizer step) -> ``forward_backward`` (this rank's packs of the step).

``fit`` holds the run directory's lock for the whole run, refuses a directory that holds another run
(``rundir``), resumes only a checkpoint of the same run identity (falling back past unreadable
ones), and keeps non-finite steps out of the weights (``guard``): it stops (or, with
``train.nonfinite: skip``, skips up to ``train.max_skipped_steps`` steps) and never exports or
checkpoints non-finite parameters.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import save_config, to_dict
from ..errors import ConfigError, Interrupted, NonFiniteError, RunError
from ..lora import add_adapters
from ..model import TrunkHead, autocast_context, resolve_device, set_tf32
from ..phases import phase
from . import rundir
from .checkpoint import (CheckpointUnreadable, export_bytes, export_lora, export_pretrained,
                         list_checkpoints, load_checkpoint, lora_export_bytes, save_checkpoint,
                         trainer_state)
from .distributed import (DistInfo, agree, all_reduce_sum, full_state_dict, init_distributed,
                          shard_model)
from .guard import BadStep, NonFiniteGuard, first_nonfinite
from .metrics import MetricsLog
from .optim import build_optimizer, cosine_with_warmup

log = logging.getLogger("polyfast")


def _to_host(out: dict, device: torch.device) -> tuple[dict, object]:
    """``out`` with its tensors copied to (pinned) host memory without waiting, and the CUDA event
    after which the copies have landed (None on a CPU: nothing to wait for)."""
    host = {k: v.detach().to("cpu", non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in out.items()}
    if device.type != "cuda":
        return host, None
    landed = torch.cuda.Event()
    landed.record()
    return host, landed


class Trainer:
    """The components a trainer holds, built in this order by ``__init__``."""

    name = "train"
    cfg: object                     # has run_dir, seed, model and train
    dist: DistInfo                  # this process's rank in the torchrun group (world 1 alone)
    device: torch.device
    tokenizer: object
    model: torch.nn.Module          # the policy, as ``load`` returns it
    runner: TrunkHead               # the policy's trunk + loss in one forward (what FSDP2 shards)
    grad_scale: float               # FSDP averages the ranks' gradients; the step loss is a sum
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: functools.partial     # a factory of fresh autocast contexts (bf16 for model.dtype
                                    # auto on CUDA)
    guard: NonFiniteGuard           # keeps non-finite steps out of the weights
    step: int                       # optimizer steps taken

    def __init__(self, cfg):
        """Threads, device and (under torchrun) the process group first; then the subclass's
        ``load``; then the policy's runner (sharded with FSDP2 under torchrun), optimizer and
        schedule."""
        self.cfg = cfg
        t = cfg.train
        if t.grad_accum < 1:
            raise ConfigError("train.grad_accum", "must be >= 1")
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        set_tf32(t.tf32)
        self.dist, self.device = init_distributed(resolve_device(t.device))
        self.tokenizer, self.model = self.load()
        self.runner = TrunkHead(self.model)
        self.grad_scale = 1.0
        if self.dist.enabled:
            shard_model(self.runner, self.device, cfg.model.dtype == "auto")
            self.grad_scale = float(self.dist.world)
        self._pack_cache: dict[int, list] = {}
        self.optimizer = build_optimizer(self.model, t.lr, t.weight_decay, t.betas)
        self.steps_per_epoch = math.ceil(len(self.packs(0)) / (t.grad_accum * self.dist.world))
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.scheduler = cosine_with_warmup(self.optimizer, self.total_steps,
                                            int(t.warmup_ratio * self.total_steps), t.min_lr_ratio)
        self.step = 0
        self.autocast = functools.partial(autocast_context, cfg.model, self.device)
        self.guard = NonFiniteGuard(self.optimizer, self.device, deferred=not self.dist.enabled)
        self.skipped: list[BadStep] = []
        self.resumed_from: str | None = None
        self._held_row: tuple | None = None  # a train row written after the next step is queued

    # -- to be provided ---------------------------------------------------------------------
    def load(self) -> tuple:
        """(tokenizer, policy model on ``self.device``), and whatever data the trainer needs;
        ``self.dist`` and ``self.device`` are set."""
        raise NotImplementedError

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
    def packs(self, epoch: int) -> list:
        """The packs of an epoch, in the order a pure function of (seed, epoch) gives them."""
        if epoch not in self._pack_cache:
            self._pack_cache = {epoch: self.make_packs(self.cfg.seed * 1000 + epoch)}
        return self._pack_cache[epoch]

    def step_packs(self, step: int) -> list:
        """All ranks' packs of a step (grad_accum per rank)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        n = self.cfg.train.grad_accum * self.dist.world
        return self.packs(epoch)[k * n:(k + 1) * n]

    # -- one optimizer step -----------------------------------------------------------------
    def train_step(self, packs: list) -> dict:
        """forward_backward of this rank's share, gradient clipping, update (unless the loss or
        gradient norm is non-finite: ``out["bad"]`` lists the bad steps known by now), schedule."""
        out = self.forward_backward(packs[self.dist.rank::self.dist.world], packs)
        out["tokens"] = sum(len(x) for p in packs for x in p)  # all ranks' tokens, on the host
        if self.dist.enabled:  # the step's loss over all ranks (a collective, not a host sync)
            out["loss"] = all_reduce_sum(out["loss"], self.dist)
        clip = self.cfg.train.grad_clip
        with phase("optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                  clip if clip else float("inf"))
            out["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            out["bad"] = self.guard.step(self.step + 1, out["loss"], out["grad_norm"])
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return out

    def _handle_bad(self, bad: list[BadStep], metrics: MetricsLog) -> None:
        """Log the non-finite steps found; stop when the config says so."""
        t = self.cfg.train
        for b in bad:
            self.skipped.append(b)
            metrics.write({"event": "nonfinite", "step": b.step, "loss": b.loss,
                           "grad_norm": b.grad_norm, "update": "skipped"})
            if t.nonfinite == "skip":
                log.warning("step %d: loss %s, gradient norm %s: its update was skipped "
                            "(%d of at most train.max_skipped_steps=%d)", b.step, b.loss,
                            b.grad_norm, len(self.skipped), t.max_skipped_steps)
        if not bad:
            return
        ckpts = list_checkpoints(self.cfg.run_dir)
        after = ("no export was written" + (f"; the last checkpoint is {ckpts[-1]}" if ckpts else "")
                 + ". Lower train.lr or check the data")
        b = bad[0]
        if t.nonfinite == "stop":
            raise NonFiniteError(
                f"step {b.step}: the loss is {b.loss} and the gradient norm {b.grad_norm}: its "
                f"update was skipped and training stopped after step {self.step} "
                f"(train.nonfinite=stop); {after}; train.nonfinite=skip skips such steps "
                "(at most train.max_skipped_steps)", b.step)
        if len(self.skipped) > t.max_skipped_steps:
            steps = ", ".join(str(x.step) for x in self.skipped[:10])
            raise NonFiniteError(
                f"{len(self.skipped)} steps had a non-finite loss or gradient norm (steps {steps}"
                f"{', ...' if len(self.skipped) > 10 else ''}), more than "
                f"train.max_skipped_steps={t.max_skipped_steps}: training stopped after step "
                f"{self.step}; {after}", b.step)

    def _check_parameters(self, what: str) -> None:
        """Refuse to write ``what`` from parameters holding NaN or infinity (a collective)."""
        name = first_nonfinite(self.model.named_parameters())
        if self.dist.enabled:
            bad = all_reduce_sum(torch.tensor(float(name is not None), device=self.device), self.dist)
            name = name or ("a parameter on another rank" if bad.item() else None)
        if name is not None:
            raise NonFiniteError(f"after step {self.step} the parameter {name} holds non-finite "
                                 f"values: {what} was not written. Lower train.lr or check the data",
                                 self.step)

    # -- checkpoints --------------------------------------------------------------------------
    def identity(self) -> dict:
        """The run identity stored with every checkpoint (see ``rundir``)."""
        config = rundir.identity(self.cfg)
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        return {"run_id": digest, "config": config}

    def save(self) -> str:
        self._check_parameters(f"checkpoint step {self.step}")
        hf = self.cfg.train.checkpoint_hf
        return save_checkpoint(self.cfg.run_dir, self.step, self.runner, self.optimizer,
                               self.scheduler, {"total_steps": self.total_steps,
                                                "grad_accum": self.cfg.train.grad_accum,
                                                **self.identity()},
                               keep=self.cfg.train.keep_checkpoints,
                               also=(lambda tmp: self.export(os.path.join(tmp, "hf"))) if hf else None,
                               also_sizes=self._export_sizes() if hf else (),
                               trainable_only=self.cfg.model.lora is not None)

    def _export_sizes(self) -> list[int]:
        lora = self.cfg.model.lora
        if lora is None:
            return export_bytes(self.model, self.tokenizer)
        return lora_export_bytes(self.model, self.tokenizer, lora.export, self.cfg.model.path)

    def _check_state(self, path: str, state: dict) -> None:
        """Refuse a checkpoint of another run, or one whose steps hold other packs."""
        saved = state.get("config")
        if saved is None:
            log.warning("%s has no run identity (an older polyfast wrote it); resuming it as "
                        "this run", path)
        else:
            diff = rundir.identity_diff(saved, self.identity()["config"])
            if diff:
                raise RunError(f"{path} belongs to a different run: " + "; ".join(diff[:8])
                               + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
                               + ". Resume with that run's config, or start a new run "
                               "(--overwrite, or another run_dir)")
        if state.get("total_steps") != self.total_steps:
            packs = state.get("world_size", 1) * state.get("grad_accum", self.cfg.train.grad_accum)
            raise ConfigError("train", f"checkpoint {path} was made for "
                              f"{state.get('total_steps')} steps, this config makes {self.total_steps}; "
                              f"a step there held {packs} packs (processes x train.grad_accum), "
                              f"here {self.dist.world * self.cfg.train.grad_accum}")

    def resume(self) -> bool:
        """Load the latest loadable checkpoint of this run: one that is unreadable (truncated,
        corrupt, or with content polyfast will not unpickle) is skipped with a warning for the one
        before it; one of a different run is refused."""
        ckpts = list_checkpoints(self.cfg.run_dir)
        failures = []
        for path in reversed(ckpts):
            try:
                self._check_state(path, trainer_state(path))
                state = load_checkpoint(path, self.runner, self.optimizer, self.scheduler,
                                        trainable_only=self.cfg.model.lora is not None)
            except CheckpointUnreadable as e:
                failures.append(f"{os.path.basename(path)}: {e}")
                log.warning("checkpoint %s cannot be loaded (%s); trying the one before it", path, e)
                continue
            self.step = state["step"]
            self.resumed_from = path
            return True
        if failures:
            raise RunError(f"no loadable checkpoint in {os.path.join(self.cfg.run_dir, 'checkpoints')}: "
                           + "; ".join(failures))
        return False

    # -- the run ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``total_steps`` in ``run_dir`` (holding its lock), evaluate, export: the
        metrics row before training, the steps, the final evaluation, export and summary."""
        with self._run_lock():
            self._open_run_dir()
            resumed = self.resumed_from is not None
            if not resumed:
                random.seed(self.cfg.seed)
                np.random.seed(self.cfg.seed)
                torch.manual_seed(self.cfg.seed)
            t = self.cfg.train
            metrics = MetricsLog(self.cfg.run_dir, resume_step=self.step if resumed else None,
                                 enabled=self.dist.main, report_to=t.report_to,
                                 run_name=t.run_name, project=t.project, config=to_dict(self.cfg))
            try:
                eval_before = self._begin(metrics, resumed)
                bar = tqdm(total=self.total_steps, initial=self.step, desc=self.name, unit="step",
                           disable=not (self.cfg.train.progress and self.dist.main),
                           dynamic_ncols=True)
                first_step, tokens, last = self.step, 0, {}
                t0 = time.perf_counter()
                try:
                    while self.step < self.total_steps:
                        out = self.train_step(self.step_packs(self.step))
                        tokens += out["tokens"]
                        last = self._after_step(out, metrics, tokens / (time.perf_counter() - t0),
                                                bar) or last
                except KeyboardInterrupt:
                    self._write_held_row(metrics, bar)  # the last whole step's
                    bar.close()
                    ckpts = list_checkpoints(self.cfg.run_dir)
                    raise Interrupted(self.step, self.total_steps,
                                      ckpts[-1] if ckpts else None) from None
                bar.close()
                self._handle_bad(self.guard.poll(wait=True), metrics)
                train_time = time.perf_counter() - t0
                eval_after = self.evaluate()
                if eval_after:
                    metrics.write({"event": "eval", "step": self.step, **eval_after})
                self._check_parameters("the final export")
                export = self.export(os.path.join(self.cfg.run_dir, "final"))
                summary = {"event": "summary", "steps": self.step,
                           "steps_run": self.step - first_step,
                           "resumed_from_step": first_step if resumed else None,
                           "train_seconds": train_time, "tokens": tokens,
                           "tokens_per_s": tokens / max(train_time, 1e-9),
                           "final_loss": last.get("loss"),
                           "skipped_steps": [b.step for b in self.skipped], "export": export,
                           **self.summary_extra()}
                metrics.write(summary)
                return {"summary": summary, "eval_before": eval_before, "eval_after": eval_after}
            finally:
                metrics.close()

    @contextlib.contextmanager
    def _run_lock(self):
        """Hold run_dir's lock (rank 0 takes it; every rank learns of a refusal)."""
        lock, problem = None, None
        if self.dist.main:
            try:
                lock = rundir.RunLock(self.cfg.run_dir).acquire()
            except RunError as e:
                problem = str(e)
        problem = agree(problem, self.dist)
        if problem:
            raise RunError(problem)
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def _open_run_dir(self) -> None:
        """Check (and with train.overwrite clear) the run directory, remove what a killed run left
        half-written, resume if asked; every rank learns of a refusal."""
        cfg, t = self.cfg, self.cfg.train
        if t.resume and t.overwrite:
            raise ConfigError("train.overwrite", "cannot be combined with train.resume (resume "
                              "continues the run in run_dir, overwrite replaces it)")
        problem = None
        if self.dist.main:
            if t.overwrite:
                rundir.clear(cfg.run_dir)
            problem = rundir.refusal(cfg.run_dir, t.resume)
            for p in [] if problem else rundir.remove_partial(cfg.run_dir):
                log.warning("removed %s, left half-written by an earlier run", p)
        problem = agree(problem, self.dist)
        if problem:
            raise RunError(problem)
        if self.dist.main:
            save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        if t.resume and not self.resume():
            log.warning("train.resume: no checkpoint in %s; starting from step 0",
                        os.path.join(cfg.run_dir, "checkpoints"))

    def _begin(self, metrics: MetricsLog, resumed: bool) -> dict:
        """Say what the data became; the metrics rows written before the first step; the
        evaluation before training (a resumed run's own, read back)."""
        main = self.dist.main
        if main:
            print(f"{self.name} data: {self.data_summary()}", flush=True)
        if resumed:
            if main:
                print(f"{self.name}: resumed from step {self.step} of {self.total_steps} "
                      f"({self.resumed_from})", flush=True)
            metrics.write({"event": "resume", "step": self.step, "checkpoint": self.resumed_from})
            return metrics.first("eval") or {}  # the run's own, from before its first step
        metrics.write({"event": "data", **self.start_row()})
        eval_before = self.evaluate()
        if eval_before:
            metrics.write({"event": "eval", "step": self.step, **eval_before})
        return eval_before

    def _after_step(self, out: dict, metrics: MetricsLog, tokens_per_s: float, bar) -> dict | None:
        """What follows a step: its non-finite report, the train row every ``log_every`` steps,
        evaluation and checkpoint at their intervals. Returns the train row written now, if any.

        A step's train row is written after the next step has been queued (``_held_row``): its
        values travel to pinned host memory behind the step's own work, so reading them waits for
        that step only and the device keeps the next one. A step that evaluates, checkpoints or
        ends the run writes its row at once (those wait for the device anyway)."""
        t = self.cfg.train
        row = self._write_held_row(metrics, bar)  # the previous step's
        self._handle_bad(out["bad"], metrics)
        evaluates = bool(t.eval_every) and self.step % t.eval_every == 0 and self.step < self.total_steps
        saves = bool(t.save_every) and self.step % t.save_every == 0 and self.step < self.total_steps
        if self.step % t.log_every == 0 or self.step == self.total_steps:
            self._held_row = (self.step, self.scheduler.get_last_lr()[0], tokens_per_s,
                              *_to_host(out, self.device))
            if evaluates or saves or self.step == self.total_steps:
                row = self._write_held_row(metrics, bar)
        if evaluates:
            metrics.write({"event": "eval", "step": self.step, **self.evaluate()})
        if saves:
            self._handle_bad(self.guard.poll(wait=True), metrics)
            self.save()
        bar.update(1)
        return row

    def _write_held_row(self, metrics: MetricsLog, bar) -> dict | None:
        """Write the held train row (waiting for its step's values only); None if none is held."""
        if self._held_row is None:
            return None
        step, lr, tokens_per_s, out, landed = self._held_row
        self._held_row = None
        if landed is not None:
            landed.synchronize()
        self._handle_bad(self.guard.poll(wait=True, upto=step), metrics)
        row = {"event": "train", "step": step, "loss": float(out["loss"]),
               "grad_norm": float(out["grad_norm"]), "lr": lr, "tokens_per_s": tokens_per_s,
               **self.train_row(out)}
        metrics.write(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
        return row

    def summary_extra(self) -> dict:
        return {}

    def data_summary(self) -> str:
        """One line on what the data became (kept, dropped, truncated, skipped rows per split),
        printed when training starts."""
        return ""

    def export(self, out_dir: str) -> str:
        """save_pretrained + tokenizer (with LoRA, what ``model.lora.export`` says); a sharded
        policy is gathered and written by rank 0."""
        if not self.dist.enabled:
            return self._export_local(self.model, out_dir)
        sd = full_state_dict(self.runner, self.dist)
        if self.dist.main:
            from transformers import AutoModelForCausalLM
            plain = AutoModelForCausalLM.from_config(self.model.config)
            if self.cfg.model.lora is not None:  # the same adapters, to hold the gathered ones
                add_adapters(plain, self.cfg.model.lora)
            plain.load_state_dict({k.removeprefix("lm."): v for k, v in sd.items()})
            self._export_local(plain, out_dir)
        torch.distributed.barrier()
        return out_dir

    def _export_local(self, model, out_dir: str) -> str:
        lora = self.cfg.model.lora
        if lora is None:
            return export_pretrained(model, self.tokenizer, out_dir)
        return export_lora(model, self.tokenizer, out_dir, lora.export, base=self.cfg.model.path)
