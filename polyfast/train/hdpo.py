"""HDPO: DPO against the frozen starting checkpoint, regularised by a critic's distance to the
bucket's human support (docs/method.md section 5).

Pairs that share a prompt form a group (``data.groups``): the prompt and its responses, laid out
with the prompt once (``hdpo.prefix_sharing``, default) or once per response; packs hold whole
groups, per bucket. One ``joint_logprobs`` call per pack gives the per-response log-prob sums of
the policy, the frozen reference (unless precomputed) and the LM critic (with ``distance: lm``);
only the policy gets a backward graph. Each pair reads its two responses' sums. The step's loss
is ``hdpo_loss`` with the step's total pair weight and pair count, so micro-batching does not
change it. With LoRA (``model.lora``) the reference is the policy with its adapters switched off
(``AdaptersOff``): the same trunk run again under no_grad, the same head tensor, no second copy.

Files read back: the pairs file (``data.load_pairs``, JSON), the reference and critic models
(``model``: safetensors), and the reference log-prob cache ``run_dir/ref_logps_*.safetensors``
(safetensors; one that does not decode to finite (pairs, 2) values is computed again, with a
warning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import HDPOConfig
from ..critic import FEATURE_NAMES, References, feature_matrix
from ..data import load_pairs, load_tokenizer
from ..data.groups import GroupExample, collate_groups, encode_groups, pack_groups
from ..data.packing import to_device
from ..data.pairs import PreferencePair, describe_counts, usable_pairs
from ..errors import ConfigError
from ..kernels import joint_logprobs
from ..lora import adapters_off, weight_files
from ..losses import hdpo_loss
from ..model import TrunkHead, head_weight, hidden_states, load_model, logit_softcap
from ..phases import phase
from .base import Trainer
from .distributed import shard_model

log = logging.getLogger("polyfast")
# the per-pair distance columns of each hdpo.distance ("lm": the critic's band of the bucket)
DISTANCE_COLUMNS = {"none": ("chosen_dist", "rejected_dist"),
                    "pairs": ("chosen_dist", "rejected_dist"),
                    "feature": ("chosen_dist", "rejected_dist"),
                    "lm": ("q10", "q90", "scale")}
METRICS = ("rewards_chosen", "rewards_rejected", "accuracy", "margin", "dist_reg", "anchor")


def _frozen(model_cfg, path: str, tokenizer, device):
    """A frozen copy of a checkpoint (the reference, or the LM critic): eval mode, no grad."""
    cfg = dataclasses.replace(model_cfg, path=path, activation_checkpointing=False, lora=None)
    model = load_model(cfg, tokenizer, device=device)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class AdaptersOff:
    """The reference under LoRA: the policy's own weights with its adapters switched off, so the
    frozen start costs no second copy of the model (live or precomputed)."""

    policy: torch.nn.Module


def _module(model):
    """The transformers model that computes for ``model`` (the policy for ``AdaptersOff``)."""
    return model.policy if isinstance(model, AdaptersOff) else model


def _view(model):
    """The context ``model`` computes in: the policy's adapters off for ``AdaptersOff``."""
    return adapters_off(model.policy) if isinstance(model, AdaptersOff) else contextlib.nullcontext()


@dataclass
class PairTable:
    """Per pair, by pair index, on the host: what the loss reads of a pair besides the policy's
    log-probs. ``values`` (pairs, columns) holds the named ``columns`` side by side, so that a
    pack's rows reach the device in one pinned, non-blocking copy (no host sync)."""

    columns: tuple[str, ...]
    values: torch.Tensor            # (pairs, len(columns)) fp32

    @classmethod
    def build(cls, named: dict[str, torch.Tensor]) -> "PairTable":
        """From (pairs,) tensors by column name."""
        return cls(tuple(named), torch.stack([v.float() for v in named.values()], 1))

    def take(self, index: list[int], device) -> dict[str, torch.Tensor]:
        """The named columns of these pairs, each (P,), on ``device``."""
        rows = to_device(self.values[index], device)  # (P, C)
        return {name: rows[:, k] for k, name in enumerate(self.columns)}


class HDPOTrainer(Trainer):
    """HDPO over packs of preference groups: policy, reference and critic log-probs in one
    ``joint_logprobs`` call per pack. Besides the base components it holds:"""

    name = "hdpo"
    pairs: list[PreferencePair]
    val_pairs: list[PreferencePair]
    examples: list[GroupExample]        # the train pairs as groups (one prompt, its responses)
    val_examples: list[GroupExample]
    reference: torch.nn.Module | AdaptersOff | None  # the frozen start (with LoRA the policy with
                                        # its adapters off); None once its log-probs are cached
    critic: torch.nn.Module | AdaptersOff | None  # the LM critic (hdpo.distance lm), maybe the
                                        # reference
    tables: dict[str, PairTable]        # split -> per-pair weight, distances, cached ref log-probs

    def __init__(self, cfg: HDPOConfig, pairs: list[PreferencePair] | None = None,
                 val_pairs: list[PreferencePair] | None = None):
        if not cfg.model.path:
            raise ConfigError("model.path", "HDPO starts from a checkpoint (the Bucket-SFT export)")
        self.pairs, self.val_pairs = pairs, val_pairs
        super().__init__(cfg)
        h = cfg.hdpo
        self.distances = {"train": self._distances(self.pairs, "train"),
                          "val": self._distances(self.val_pairs, "val")}
        # the LM critic's bands above are built unsharded; from here on frozen models run through
        # their own TrunkHead, sharded when hdpo.frozen is "shard"
        self._frozen_runners: dict[int, TrunkHead] = {}
        self.frozen_sharded = self.dist.enabled and h.frozen == "shard"
        if self.frozen_sharded:
            frozen_models = {id(m): m for m in (self.reference, self.critic)
                             if m is not None and not isinstance(m, AdaptersOff)}
            for frozen in frozen_models.values():  # a critic that is the reference: sharded once
                shard_model(self._runner(frozen), self.device, cfg.model.dtype == "auto")
        self.tables = {}
        for split, pairs, examples in (("train", self.pairs, self.examples),
                                       ("val", self.val_pairs, self.val_examples)):
            named = {"weight": torch.tensor([p.weight for p in pairs], dtype=torch.float32)}
            named.update(zip(DISTANCE_COLUMNS[h.distance], self.distances[split]))
            if h.reference == "precomputed":
                ref = self._reference_logps(examples, len(pairs))  # (pairs, 2)
                named.update(ref_chosen=ref[:, 0], ref_rejected=ref[:, 1])
            self.tables[split] = PairTable.build(named)
        if h.reference == "precomputed":
            self.reference = None  # no longer held in memory

    def load(self):
        cfg = self.cfg
        d, h = cfg.data, cfg.hdpo
        pairs, val_pairs = self.pairs, self.val_pairs
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        if pairs is None:
            if not d.pairs:
                raise ConfigError("data.pairs", "a pairs file is needed")
            pairs = load_pairs(d.pairs, skip_bad_rows=d.skip_bad_rows, legacy_tokens=d.legacy_tokens)
        if val_pairs is None and d.val_pairs:
            val_pairs = load_pairs(d.val_pairs, skip_bad_rows=d.skip_bad_rows,
                                   legacy_tokens=d.legacy_tokens)
        # a pair with an empty side or equal sides teaches no preference: dropped and counted
        pairs, dropped = usable_pairs(pairs)
        val_pairs, val_dropped = usable_pairs(val_pairs or [])
        for split, counts in (("train", dropped), ("val", val_dropped)):
            if counts:
                log.warning("%s pairs dropped: %s", split, describe_counts(counts))
        if not pairs:
            raise ConfigError("data.pairs", f"no usable pair in {d.pairs or 'the pairs given'} "
                              f"({describe_counts(dropped)})")
        self.pairs, self.val_pairs = pairs, val_pairs
        encode = functools.partial(encode_groups, tokenizer, system=d.system_prompt,
                                   max_tokens=d.max_tokens, overlong=d.overlong,
                                   shared=h.prefix_sharing)
        # groups: the pairs of one prompt, laid out with the prompt once (hdpo.prefix_sharing)
        self.examples, self.counts = encode(self.pairs)
        self.counts.update(dropped)
        self.val_examples, _ = encode(self.val_pairs)
        if not self.examples:
            raise ConfigError("data.max_tokens", "no pair fits its pack")
        self.bucket_names = sorted({p.bucket_id for p in self.pairs + self.val_pairs})
        model = load_model(cfg.model, tokenizer, seed=cfg.seed, device=self.device)
        self.softcap = logit_softcap(model)
        # with LoRA the policy's base weights are the start: the reference is them, adapters off
        self.reference = (AdaptersOff(model) if cfg.model.lora is not None
                          else _frozen(cfg.model, cfg.model.path, tokenizer, self.device))
        self.critic = None
        if h.distance == "lm":
            critic_path = h.critic_model or cfg.model.path
            # the default critic is the starting checkpoint: the reference itself, held once
            self.critic = (self.reference if critic_path == cfg.model.path
                           else _frozen(cfg.model, critic_path, tokenizer, self.device))
            self._lm_refs = self._lm_references(tokenizer)
        return tokenizer, model

    # -- critic distances ---------------------------------------------------------------------
    def _distances(self, pairs: list[PreferencePair], split: str):
        """Per pair the tensors of ``DISTANCE_COLUMNS[hdpo.distance]``: (dc, dr), or for the LM
        critic the band (q10, q90, scale) of the pair's bucket."""
        h = self.cfg.hdpo
        n = len(pairs)
        if h.distance == "none" or n == 0:
            return tuple(torch.zeros(n) for _ in DISTANCE_COLUMNS[h.distance])
        if h.distance == "pairs":
            missing = [p.id for p in pairs if p.chosen_dist is None or p.rejected_dist is None]
            if missing:
                raise ConfigError("hdpo.distance", f"'pairs' needs chosen_dist and rejected_dist in "
                                  f"the pair file; {len(missing)} {split} pairs lack them (first: "
                                  f"{missing[0]})")
            return (torch.tensor([p.chosen_dist for p in pairs]),
                    torch.tensor([p.rejected_dist for p in pairs]))
        if h.distance == "feature":
            refs = self._feature_refs()
            buckets = [p.bucket_id for p in pairs]
            return (torch.tensor(refs.distance(feature_matrix(p.chosen for p in pairs), buckets)),
                    torch.tensor(refs.distance(feature_matrix(p.rejected for p in pairs), buckets)))
        # lm: the critic's band of the bucket (``_lm_references``, built by ``load``)
        bands = [self._lm_refs.lookup(p.bucket_id)[1] for p in pairs]
        q10 = torch.tensor([b["q10"][0] for b in bands])
        q90 = torch.tensor([b["q90"][0] for b in bands])
        scale = torch.tensor([float(self._lm_refs.scale(p.bucket_id)[0]) for p in pairs])
        return q10, q90, scale

    def _lm_references(self, tokenizer) -> References:
        """The LM critic's mean NLL band over the human (chosen) side of the TRAIN pairs. Built
        in ``load``, before any model is sharded (with LoRA the critic is the policy itself)."""
        from ..critic import response_logprobs
        h = self.cfg.hdpo
        human = self._human_records([i for g in self.examples for i, _, _ in g.pairs])
        with torch.no_grad(), _view(self.critic):
            lps = response_logprobs(_module(self.critic), tokenizer, human,
                                    system=self.cfg.data.system_prompt,
                                    max_tokens=self.cfg.data.max_tokens // 2)
        nll = np.array([[-x.mean()] for x in lps])
        return References.build(human, nll, ["lm_nll"], h.min_bucket_size, h.band_floor)

    def _human_records(self, indices):
        """The distinct human responses of these pairs (the K pairs of a record with K sampled
        responses hold its human response once), for the bands of the human support."""
        seen = {}
        for i in indices:
            r = self.pairs[i].record
            seen.setdefault((r.id, r.bucket_id, r.prompt, r.response), r)
        return list(seen.values())

    def _feature_refs(self) -> References:
        if not hasattr(self, "_frefs"):
            h = self.cfg.hdpo
            if h.references:
                self._frefs = dataclasses.replace(References.load(h.references),
                                                  band_floor=h.band_floor)
            else:  # the human side of the TRAIN pairs
                recs = self._human_records(range(len(self.pairs)))
                self._frefs = References.build(recs, feature_matrix(r.response for r in recs),
                                               FEATURE_NAMES, h.min_bucket_size, h.band_floor)
        return self._frefs

    # -- reference log-probs, cached on disk ---------------------------------------------------
    def _reference_logps(self, examples: list[GroupExample], n_pairs: int) -> torch.Tensor:
        """(n_pairs, 2) reference log-prob sums by pair index (0 for pairs that did not fit),
        computed once and cached under run_dir, keyed by the pairs' tokens and the reference
        checkpoint."""
        if not examples:
            return torch.zeros(n_pairs, 2)
        digest = hashlib.sha256(b"rows by pair index")  # the layout of the cached tensor
        for g in examples:  # the log-probs depend on the tokens, not on the layout
            digest.update(repr((g.prompt, g.responses, g.pairs)).encode())
        for name in weight_files(self.cfg.model.path):  # (an adapter's base too)
            st = os.stat(name)
            digest.update(f"{os.path.basename(name)}:{st.st_size}:{st.st_mtime_ns}".encode())
        path = os.path.join(self.cfg.run_dir, f"ref_logps_{digest.hexdigest()[:16]}.safetensors")
        if os.path.exists(path):
            try:
                cached = load_file(path)["ref_logps"]
            except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, not fatal
                cached = e
            if isinstance(cached, torch.Tensor) and cached.shape == (n_pairs, 2) \
                    and torch.isfinite(cached).all():
                return cached
            log.warning("%s is not a cache of (%d, 2) finite log-probs (%s); computing it again",
                        path, n_pairs, cached if isinstance(cached, Exception) else "bad values")
        out = torch.zeros(n_pairs, 2)
        with torch.no_grad():
            for pack in pack_groups(examples, self.cfg.data.max_tokens):
                sums, _, sc = self._logps(pack, [self.reference], [False])
                sides = torch.stack([sums[0, sc.chosen], sums[0, sc.rejected]], 1)  # (P, 2)
                out[sc.pair_index] = sides.float().cpu()
        if self.dist.main:  # every rank computed the same values (a sharded reference needs all)
            os.makedirs(self.cfg.run_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"  # another run may be writing the same cache
            save_file({"ref_logps": out.contiguous()}, tmp)
            os.replace(tmp, path)
        if self.dist.enabled:
            torch.distributed.barrier()
        return out

    # -- packs and the step ---------------------------------------------------------------------
    def make_packs(self, seed: int):
        return pack_groups(self.examples, self.cfg.data.max_tokens, seed=seed)

    def _runner(self, model):
        """The TrunkHead that runs ``model`` (the policy's, or a frozen model's own)."""
        model = _module(model)
        if model is self.model:
            return self.runner
        if id(model) not in self._frozen_runners:
            self._frozen_runners[id(model)] = TrunkHead(model)
        return self._frozen_runners[id(model)]

    def _logps(self, pack, models, grads):
        """Per-response log-prob sums (M, S) of ``models`` over a pack of groups, the responses'
        token counts (S,) and the pack's :class:`Scoring` (which responses each pair compares).
        Each model runs through its TrunkHead, so a sharded model is gathered while the kernel
        reads its head. Only the hidden rows that predict response tokens reach the kernel (a
        shared prompt's last row once per response). Replicated frozen models join models[0]'s
        ``joint_logprobs`` launch; sharded ones gather their own weights, one launch each."""
        with phase("data"):
            batch, _ = collate_groups(pack, self.bucket_names)
            batch = batch.to(self.device)
        sc = batch.scored

        def joint(ms, gs):  # the runner hands over models[0]'s hidden states and head weight
            def fn(first_hidden, first_weight):
                hiddens, weights = [first_hidden.index_select(0, sc.rows)], [first_weight]
                for m in ms[1:]:  # (inside the runner's autocast)
                    with torch.no_grad(), _view(m), phase("reference"):
                        hiddens.append(hidden_states(_module(m), batch).index_select(0, sc.rows))
                    # with LoRA the reference's head is the policy's: the same tensor
                    weights.append(head_weight(_module(m)))
                return joint_logprobs(hiddens, weights, sc.targets, sc.segments, sc.num_segments,
                                      softcaps=[logit_softcap(_module(m)) for m in ms],
                                      requires_grad=gs, backend=self.cfg.hdpo.loss_backend)
            return fn

        groups = ([([m], [g]) for m, g in zip(models, grads)] if self.frozen_sharded
                  else [(models, grads)])
        out = []
        for ms, gs in groups:  # (a sharded frozen model's own launch: its time is the reference's)
            with (torch.set_grad_enabled(gs[0]), _view(ms[0]),
                  contextlib.nullcontext() if gs[0] else phase("reference")):
                out.append(self._runner(ms[0])(batch, joint(ms, gs), self.autocast))
        if len(out) == 1:
            return (*out[0], sc)
        return torch.cat([sums for sums, _ in out]), out[0][1], sc

    def _pack_loss(self, pack, split: str, weight_sum, num_pairs, train: bool):
        h = self.cfg.hdpo
        models, grads = [self.model], [train]
        if self.reference is not None:
            models.append(self.reference)
            grads.append(False)
        if self.critic is not None and self.critic is not self.reference:
            models.append(self.critic)  # (a critic that is the live reference reuses its row)
            grads.append(False)
        sums, counts, sc = self._logps(pack, models, grads)  # (M, S) per response, (S,)
        pair = self.tables[split].take(sc.pair_index, self.device)  # name -> (P,)
        c, r = sc.chosen, sc.rejected  # (P,) each pair's two responses
        pc, pr = sums[0, c], sums[0, r]
        if self.reference is not None:
            rc, rr = sums[1, c], sums[1, r]
        else:
            rc, rr = pair["ref_chosen"], pair["ref_rejected"]
        if h.distance == "lm":
            nll = -sums[-1] / counts.clamp(min=1)  # (S,) the critic's mean NLL per response

            def band(x):  # the distance of a mean NLL to the band [q10, q90], in band scales
                return (torch.relu(pair["q10"] - x) + torch.relu(x - pair["q90"])) / pair["scale"]
            dc, dr = band(nll[c]), band(nll[r])
        else:
            dc, dr = pair["chosen_dist"], pair["rejected_dist"]
        return hdpo_loss(pc, pr, rc, rr, dc, dr, pair["weight"], counts[c], beta=h.beta,
                         reg_lambda=h.reg_lambda, ftx=h.ftx, label_smoothing=h.label_smoothing,
                         weight_sum=weight_sum, num_pairs=num_pairs)

    def forward_backward(self, packs, step_packs=None) -> dict:
        self.model.train()
        step_packs = step_packs or packs  # the step's totals span all ranks' packs
        pairs = [i for pack in step_packs for g in pack for i, _, _ in g.pairs]
        weight_sum = sum(self.pairs[i].weight for i in pairs)
        num_pairs = len(pairs)
        loss_total = torch.zeros((), device=self.device)
        per_pair = {k: [] for k in METRICS}
        buckets = []
        for pack in packs:
            loss, m = self._pack_loss(pack, "train", weight_sum, num_pairs, train=True)
            with phase("backward"):
                (loss * self.grad_scale).backward()
            loss_total += loss.detach()
            for k in METRICS:
                per_pair[k].append(m[k])
            buckets += [g.bucket for g in pack for _ in g.pairs]
        return {"loss": loss_total, "buckets": buckets,
                **{k: torch.cat(v) for k, v in per_pair.items()}}

    def train_row(self, out: dict) -> dict:
        return _summarise(out, out["buckets"])

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Reward accuracy and margin per bucket on the held-out pairs (if any)."""
        if not self.val_examples:
            return {}
        self.model.eval()
        per_pair = {k: [] for k in METRICS}
        buckets = []
        for pack in pack_groups(self.val_examples, self.cfg.data.max_tokens):
            _, m = self._pack_loss(pack, "val", None, None, train=False)
            for k in METRICS:
                per_pair[k].append(m[k])
            buckets += [g.bucket for g in pack for _ in g.pairs]
        return _summarise({k: torch.cat(v) for k, v in per_pair.items()}, buckets)

    def data_summary(self) -> str:
        val = f"; val: {len(self.val_pairs):,} pairs" if self.val_pairs else ""
        return (f"train: {len(self.pairs):,} pairs in {len(self.examples):,} groups "
                f"({describe_counts(self.counts)}){val}; {len(self.bucket_names)} buckets, "
                f"{len(self.packs(0))} packs per epoch")

    def start_row(self) -> dict:
        return {"pairs": len(self.pairs), "val_pairs": len(self.val_pairs),
                "packs_per_epoch": len(self.packs(0)), "counts": dict(self.counts),
                "distance": self.cfg.hdpo.distance, "reference": self.cfg.hdpo.reference,
                "prefix_sharing": self.cfg.hdpo.prefix_sharing,
                "tokens_per_epoch": sum(g.computed_tokens for g in self.examples),
                "pair_tokens_per_epoch": sum(g.pair_tokens for g in self.examples)}


def _summarise(out: dict, buckets: list[str]) -> dict:
    """Means of the per-pair metrics, overall and per bucket (accuracy and margin)."""
    vals = {k: out[k].float().cpu().numpy() for k in METRICS}
    row = {k: float(v.mean()) for k, v in vals.items()}
    per = {}
    for b in sorted(set(buckets)):
        sel = np.array([x == b for x in buckets])
        per[b] = {"accuracy": float(vals["accuracy"][sel].mean()),
                  "margin": float(vals["margin"][sel].mean()), "pairs": int(sel.sum())}
    row["buckets"] = per
    return row
