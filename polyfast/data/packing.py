"""Packing: examples -> packs -> batches, in the one batch format polyfast uses everywhere.

A pack is a list of whole examples laid end to end in one row of at most ``max_tokens`` tokens:

    input_ids (1, T)  position_ids (1, T) restarting at 0 per example  cu_seqlens (E+1,) int32
    max_seqlen        labels (1, T) (-100 on prompt tokens)             token_weights (T,) fp32
    bucket_ids (T,)   (index into the batch's ``bucket_names``)

Modes: "bucket" (default) packs first-fit-decreasing within each bucket, so a pack never mixes
buckets; "mixed" packs first-fit-decreasing over all examples; "none" is the padded baseline:
``batch_size`` examples per batch, one per row, padded to the longest (``attention_mask`` (B, L)).

Preference groups (HDPO, ``data.groups``) use the same batch, and where a prompt is shared by
several responses add ``kv_index`` (T_k,) with ``cu_seqlens_k`` / ``max_seqlen_k``: the keys each
query segment attends to, gathered from the stream.

What the loss head reads of a batch is its :class:`ScoredTokens`: per scored token, the row of the
(T, H) hidden stream that predicts it (the row of the token before it), its target, its weight and
its segment. The trainers gather those rows before the head, so no prompt row reaches a kernel.

Token weights make the step loss of docs/method.md section 2 independent of how examples are
grouped: each response token of example i gets ``omega = m_i / T_i`` (m_i its mass: w_b for bucket
weighting, 1 for example weighting; token weighting uses omega = 1, m_i = T_i). A micro-batch then
contributes ``sum_t omega_t * CE_t`` and the step divides by the sum of m_i over its examples
(``polyfast.losses`` states the whole loss).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from ..kernels.checks import IGNORE_INDEX
from .tokenize import Example

PACKINGS = ("bucket", "mixed", "none")
WEIGHTINGS = ("bucket", "example", "token")
# the keyword that carries a batch's key gather index from ``model.model(...)`` to the attention
# function (transformers forwards unknown keywords to it untouched)
KV_INDEX = "polyfast_kv_index"


def first_fit_decreasing(items: Sequence, capacity: int, tie=lambda e: e.record_id) -> list[list]:
    """Bins of at most ``capacity`` tokens, longest items first (ties broken by ``tie``); items
    are examples or pairs (anything with a length and a record_id)."""
    order = sorted(items, key=lambda e: (-len(e), tie(e)))
    bins: list[list] = []
    free: list[int] = []
    for ex in order:
        if len(ex) > capacity:
            raise ValueError(f"{ex.record_id} has {len(ex)} tokens > max_tokens {capacity}; "
                             "fit lengths before packing")
        for i, room in enumerate(free):
            if len(ex) <= room:
                bins[i].append(ex)
                free[i] -= len(ex)
                break
        else:
            bins.append([ex])
            free.append(capacity - len(ex))
    return bins


def pack_examples(examples: Sequence[Example], max_tokens: int, packing: str = "bucket", *,
                  batch_size: int = 1, seed: int | None = None) -> list[list[Example]]:
    """Group examples into packs (see the module docstring). Examples are never split.

    ``seed`` shuffles the order of packs ("none": of examples before grouping); None keeps the
    deterministic packing order.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    if packing == "none":
        items = list(examples)
        if seed is not None:
            random.Random(seed).shuffle(items)
        packs = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
        return packs
    if packing == "mixed":
        packs = first_fit_decreasing(examples, max_tokens)
    else:
        by_bucket: dict[str, list[Example]] = {}
        for ex in examples:
            by_bucket.setdefault(ex.bucket, []).append(ex)
        packs = [p for b in sorted(by_bucket)
                 for p in first_fit_decreasing(by_bucket[b], max_tokens)]
    if seed is not None:
        random.Random(seed).shuffle(packs)
    return packs


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory without blocking the host (a
    copy from pageable memory waits for the stream: a host sync in the middle of a step)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def example_mass(ex: Example, weighting: str = "bucket") -> float:
    """m_i: what example i adds to the step's normaliser."""
    if weighting == "bucket":
        return ex.weight
    if weighting == "example":
        return 1.0
    if weighting == "token":
        return float(ex.n_response)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def token_weight(ex: Example, weighting: str) -> float:
    """omega_i = m_i / T_i, the weight of each of example i's response tokens (1 for token
    weighting)."""
    if weighting == "token":
        return 1.0
    return example_mass(ex, weighting) / max(ex.n_response, 1)


@dataclass
class ScoredTokens:
    """The loss head's input, built with the batch: per scored token (N of them, in stream
    order), the hidden row that predicts it, its target, weight, segment and bucket."""

    rows: torch.Tensor          # (N,) int64 rows of the batch's (T, H) hidden states
    targets: torch.Tensor       # (N,) int64
    weights: torch.Tensor       # (N,) fp32: omega for SFT, 1 for HDPO's log-prob sums
    segments: torch.Tensor      # (N,) int64: the example (SFT) or response (HDPO) in the pack
    num_segments: int
    buckets: torch.Tensor       # (N,) int64: index into the batch's bucket_names

    TENSORS = ("rows", "targets", "weights", "segments", "buckets")

    def to(self, device):
        """A copy on ``device`` (``to_device`` for each tensor)."""
        out = dataclasses.replace(self)
        for name in self.TENSORS:
            setattr(out, name, to_device(getattr(self, name), device))
        return out


@dataclass
class Batch:
    """One micro-batch. Packed: all (1, T) with ``cu_seqlens``; padded ("none"): (B, L) with
    ``attention_mask``. ``mass`` is the sum of the examples' m_i (a Python float: no device sync)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    token_weights: torch.Tensor
    bucket_ids: torch.Tensor
    bucket_names: list[str]
    mass: float
    num_examples: int
    num_tokens: int            # real (non-pad) tokens
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    attention_mask: torch.Tensor | None = None
    # keys other than the queries (prefix-shared groups, see data.groups): the stream positions
    # of every segment's keys, their segments and the longest
    kv_index: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_k: int = 0
    scored: ScoredTokens | None = None  # what the loss head reads (SFT; HDPO: data.groups)

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def to(self, device) -> "Batch":
        out = Batch(**self.__dict__)
        for name in ("input_ids", "position_ids", "labels", "token_weights", "bucket_ids",
                     "cu_seqlens", "attention_mask", "kv_index", "cu_seqlens_k"):
            t = getattr(self, name)
            if t is not None:
                setattr(out, name, to_device(t, device))
        if self.scored is not None:
            out.scored = self.scored.to(device)
        return out

    def model_inputs(self) -> dict:
        """Keyword arguments of ``model.model(...)`` for this batch."""
        if self.packed:
            inputs = dict(input_ids=self.input_ids, position_ids=self.position_ids,
                          cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                          max_length_q=self.max_seqlen, max_length_k=self.max_seqlen)
            if self.kv_index is not None:  # keys other than the queries (data.groups)
                inputs.update(cu_seq_lens_k=self.cu_seqlens_k, max_length_k=self.max_seqlen_k,
                              **{KV_INDEX: self.kv_index})
            return inputs
        return dict(input_ids=self.input_ids, position_ids=self.position_ids,
                    attention_mask=self.attention_mask)


def collate(pack: Sequence[Example], bucket_names: Sequence[str], *, weighting: str = "bucket",
            padded: bool = False, pad_id: int = 0) -> Batch:
    """Lay a pack out in the batch format. ``bucket_names`` fixes the bucket -> id mapping.
    Built with tensor ops over the pack's examples (no Python loop over tokens)."""
    index = {b: i for i, b in enumerate(bucket_names)}
    for ex in pack:
        if ex.n_prompt < 1:
            raise ValueError(f"example {ex.record_id} has no prompt token: its first label would "
                             "be predicted across an example boundary")
    lens = [len(ex) for ex in pack]
    n = torch.tensor(lens)
    example = torch.repeat_interleave(torch.arange(len(pack)), n)  # (T,) each token's example
    cu = torch.zeros(len(pack) + 1, dtype=torch.int32)
    cu[1:] = n.cumsum(0)
    pos = torch.arange(sum(lens)) - cu[:-1].long()[example]  # (T,) restarts at 0 per example
    prompt = pos < torch.tensor([ex.n_prompt for ex in pack])[example]  # (T,)
    ids = torch.cat([torch.tensor(ex.input_ids, dtype=torch.long) for ex in pack])  # (T,)
    labels = ids.masked_fill(prompt, IGNORE_INDEX)
    weights = torch.tensor([token_weight(ex, weighting) for ex in pack],
                           dtype=torch.float32)[example].masked_fill(prompt, 0.0)
    buckets = torch.tensor([index[ex.bucket] for ex in pack])[example]
    mass = sum(example_mass(ex, weighting) for ex in pack)
    common = dict(bucket_names=list(bucket_names), mass=mass, num_examples=len(pack),
                  num_tokens=sum(lens), max_seqlen=max(lens))
    # the scored tokens: each response token, predicted by the row before it (the same example's:
    # every example starts with a prompt token)
    t = (~prompt).nonzero()[:, 0]  # (N,) stream positions of the response tokens

    def scored(rows: torch.Tensor) -> ScoredTokens:  # rows: those of t in the batch's layout
        return ScoredTokens(rows=rows - 1, targets=ids[t], weights=weights[t], segments=example[t],
                            num_segments=len(pack), buckets=buckets[t])
    if not padded:
        return Batch(input_ids=ids[None], position_ids=pos[None], labels=labels[None],
                     token_weights=weights, bucket_ids=buckets, cu_seqlens=cu, scored=scored(t),
                     **common)
    B, L = len(pack), max(lens)
    mask = torch.arange(L)[None, :] < n[:, None]  # (B, L); True positions in row-major = tokens
    common["scored"] = scored(mask.flatten().nonzero()[:, 0][t])  # rows of the (B * L, H) states

    def pad(flat: torch.Tensor, value) -> torch.Tensor:  # (T,) -> (B, L)
        out = torch.full((B, L), value, dtype=flat.dtype)
        out[mask] = flat
        return out
    return Batch(input_ids=pad(ids, pad_id), position_ids=pad(pos, 0),
                 labels=pad(labels, IGNORE_INDEX), token_weights=pad(weights, 0.0).flatten(),
                 bucket_ids=pad(buckets, -1).flatten(), attention_mask=mask.long(), **common)


def packing_efficiency(packs: Sequence[Sequence[Example]], max_tokens: int, packing: str) -> float:
    """Real tokens / token slots the batches occupy (padded rows for "none", max_tokens per pack)."""
    real = sum(len(e) for p in packs for e in p)
    if packing == "none":
        slots = sum(len(p) * max(len(e) for e in p) for p in packs)
    else:
        slots = len(packs) * max_tokens
    return real / max(slots, 1)
