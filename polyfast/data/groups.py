"""Preference groups: one prompt with its responses, laid out once (prefix sharing) or per response.

HDPO scores pairs (prompt, chosen, rejected). Pairs that share a prompt (both sides of one pair; the
K pairs of a record with K sampled responses) form a *group*: the prompt, its n >= 2 distinct
responses and the pairs among them. A group is the unit of packing: packs hold whole groups of one
bucket (``packing: bucket``) or of any (``mixed``).

Layouts (``hdpo.prefix_sharing``):

    shared     [prompt | r_1 | r_2 | ... | r_n]   the prompt at positions 0..P-1, each r_j at P..
    unshared   [prompt | r_1] [prompt | r_2] ...  positions restart at 0 per sequence

Both give the same log-probs: a response's positions are what an unshared sequence gives it (RoPE
sees the same angles) and its attention sees the prompt and its own earlier tokens, never another
response. In the batch this is a varlen call whose queries and keys differ:

    cu_seqlens (q)  [prompt + r_1], [r_2], ..., [r_n]    contiguous query segments of the stream
    kv_index (T_k,) stream positions of each segment's keys: [prompt + r_1], [prompt + r_2], ...
    cu_seqlens_k    the key segments in kv_index (lengths P + R_j)

with causal masks aligned bottom-right (a segment's last query sees all its keys), as FlashAttention
aligns them when there are more keys than queries. The prompt's keys and values are gathered once
per response after it; gradients flow back into the prompt through the gather.

Scoring: token t of response j is predicted by the hidden row of the token before it, its own token
t - 1, or for t = 0 the last prompt token: in the shared layout that row serves every response of
the group. :class:`Scoring` lists, per scored token, that row, the target and the response's segment
(its index in the pack); the loss gathers those rows before the head (no (T, V) logits, no prompt
rows sent to the kernel).

Nothing but the layout depends on ``prefix_sharing``, so the switch changes speed, not training: a
pair's prompt is cut from the left (``overlong: truncate_left``) until each side fits half a pack,
and the cut prompt is the one both sides and the group share; groups are split and packed by their
unshared length (``len(group)``: every response with its prompt), so both layouts make the same
packs and take the same steps. A pack of ``max_tokens`` then computes fewer tokens when shared;
raise ``data.max_tokens`` to spend the memory that frees.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from .packing import IGNORE_INDEX, Batch, ScoredTokens, first_fit_decreasing
from .pairs import PreferencePair
from .tokenize import encode_record


@dataclass(frozen=True)
class GroupExample:
    """A prompt, its distinct responses and the pairs among them (as response indices)."""

    prompt: tuple[int, ...]
    responses: tuple[tuple[int, ...], ...]
    pairs: tuple[tuple[int, int, int], ...]   # (pair index, chosen response, rejected response)
    bucket: str
    record_id: str = ""
    shared: bool = True                       # the layout: prompt once, or once per response
    truncated: int = 0                        # prompt tokens cut from the left

    @property
    def index(self) -> int:
        """The first pair's index: a stable tie-break for packing."""
        return self.pairs[0][0]

    def layout_length(self, shared: bool) -> int:
        """Tokens of the group in the shared or the unshared layout."""
        copies = 1 if shared else len(self.responses)
        return copies * len(self.prompt) + sum(len(r) for r in self.responses)

    def __len__(self) -> int:
        """The unshared length, which packing counts in both layouts (same packs, same steps)."""
        return self.layout_length(False)

    @property
    def computed_tokens(self) -> int:
        """Tokens the group's own layout runs through the model."""
        return self.layout_length(self.shared)

    @property
    def pair_tokens(self) -> int:
        """Tokens of the group's pairs laid out as plain pairs, the prompt once per side: the
        work a pair trainer without grouping or sharing would do."""
        return sum(2 * len(self.prompt) + len(self.responses[c]) + len(self.responses[r])
                   for _, c, r in self.pairs)


def encode_groups(tokenizer, pairs: Sequence[PreferencePair], *, system: str, max_tokens: int,
                  overlong: str = "truncate_left", shared: bool = True
                  ) -> tuple[list[GroupExample], Counter]:
    """Tokenise pairs and group those with the same bucket and (cut) prompt.

    Each pair's prompt is cut so that both sides fit ``max_tokens // 2`` (or the pair is dropped:
    ``overlong: drop``, or a response that does not fit with one prompt token); counted as
    ``truncated_prompt`` / ``dropped_overlong``. A group longer than a pack (unshared) is split
    into groups that fit (a single pair always does). Returns the groups in the order of their
    first pair, and the counts (``kept``: pairs, ``groups``).
    """
    if overlong not in ("truncate_left", "drop"):
        raise ValueError(f"overlong must be truncate_left or drop, got {overlong!r}")
    half = max_tokens // 2
    counts: Counter = Counter()
    members: dict[tuple, list] = {}   # (bucket, cut prompt) -> [(i, chosen, rejected, cut, id)]
    for i, p in enumerate(pairs):
        c = encode_record(tokenizer, p.record, system=system)
        r = encode_record(tokenizer, dataclasses.replace(p.record, response=p.rejected),
                          system=system)
        prompt = c.input_ids[:c.n_prompt]  # the prompt renders without the response: one for both
        sides = (c.input_ids[c.n_prompt:], r.input_ids[r.n_prompt:])
        longest = max(len(x) for x in sides)
        cut = max(0, len(prompt) + longest - half)
        if cut and (overlong == "drop" or longest + 1 > half):
            counts["dropped_overlong"] += 1
            continue
        counts["truncated_prompt"] += cut > 0
        members.setdefault((p.bucket_id, prompt[cut:]), []).append((i, *sides, cut, p.id))
    groups = []
    for (bucket, prompt), items in members.items():
        groups += _split(prompt, items, bucket, max_tokens, shared)
    counts["kept"] = sum(len(g.pairs) for g in groups)
    counts["groups"] = len(groups)
    return groups, counts


def _split(prompt, items, bucket: str, max_tokens: int, shared: bool) -> list[GroupExample]:
    """The pairs of one prompt (``items``: pair index, chosen, rejected, cut, record id) as groups
    that each fit ``max_tokens`` unshared, each distinct response once per group."""
    out, chunk = [], []
    for item in items:
        sides = set(item[1:3])
        held = {x for c in chunk for x in c[1:3]}
        if chunk and sum(len(prompt) + len(x) for x in held | sides) > max_tokens:
            out.append(chunk)
            chunk = []
        chunk.append(item)
    out.append(chunk)
    groups = []
    for chunk in out:
        responses = list(dict.fromkeys(x for c in chunk for x in c[1:3]))  # first-seen order
        at = {x: k for k, x in enumerate(responses)}
        groups.append(GroupExample(prompt, tuple(responses),
                                   tuple((i, at[c], at[r]) for i, c, r, _, _ in chunk), bucket,
                                   record_id=chunk[0][4], shared=shared, truncated=chunk[0][3]))
    return groups


def pack_groups(groups: Sequence[GroupExample], max_tokens: int, seed: int | None = None,
                packing: str = "bucket") -> list[list[GroupExample]]:
    """First-fit-decreasing of whole groups, per bucket ("bucket") or across buckets ("mixed");
    ``seed`` shuffles the packs' order."""
    by_key: dict[str, list[GroupExample]] = {}
    for g in groups:
        by_key.setdefault(g.bucket if packing == "bucket" else "", []).append(g)
    packs = [p for key in sorted(by_key)
             for p in first_fit_decreasing(by_key[key], max_tokens, tie=lambda g: g.index)]
    if seed is not None:
        random.Random(seed).shuffle(packs)
    return packs


@dataclass
class Scoring(ScoredTokens):
    """What the loss reads of a group pack: the scored tokens (``ScoredTokens``: segments are the
    pack's responses, weights 1) and, per pair, the segments of its two sides."""

    chosen: torch.Tensor            # (P,) int64 segment of each pair's chosen side
    rejected: torch.Tensor          # (P,) int64 segment of each pair's rejected side
    pair_index: list[int]           # (P,) the pairs' indices (host)

    TENSORS = (*ScoredTokens.TENSORS, "chosen", "rejected")


def collate_groups(pack: Sequence[GroupExample], bucket_names: Sequence[str]
                   ) -> tuple[Batch, Scoring]:
    """Lay a pack of groups out (each in its own layout) as one packed batch and its scoring.

    The batch's ``labels`` hold the response tokens at their stream positions (-100 on prompts):
    in the shared layout the first token of a later response is not predicted by the position
    before it, so losses read :class:`Scoring`, not shifted labels."""
    index = {b: i for i, b in enumerate(bucket_names)}
    ids, pos, lab, bucket = [], [], [], []         # per stream piece
    q_lens, k_index, k_lens = [], [], []           # per attention segment
    rows = []                                      # per response
    chosen, rejected, pair_index = [], [], []
    sharing = False
    start, n_seg = 0, 0

    def piece(tokens, first_pos: int, is_prompt: bool, b: int) -> int:
        nonlocal start
        t = torch.tensor(tokens, dtype=torch.long)
        ids.append(t)
        pos.append(torch.arange(first_pos, first_pos + len(tokens)))
        lab.append(torch.full_like(t, IGNORE_INDEX) if is_prompt else t)
        bucket.append(torch.full_like(t, b))
        s, start = start, start + len(tokens)
        return s

    for g in pack:
        if not g.prompt:
            raise ValueError(f"group {g.record_id} has no prompt token: its first response token "
                             "would be predicted across a group boundary")
        b, P = index[g.bucket], len(g.prompt)
        first = n_seg
        if g.shared:
            p0 = piece(g.prompt, 0, True, b)
            sharing |= len(g.responses) > 1
        for j, r in enumerate(g.responses):
            if not r:
                raise ValueError(f"group {g.record_id} has an empty response")
            if not g.shared:
                p0 = piece(g.prompt, 0, True, b)
            r0 = piece(r, P, False, b)
            # the row before each response token: the last prompt row, then its own tokens
            rows.append(torch.cat([torch.tensor([p0 + P - 1]), torch.arange(r0, r0 + len(r) - 1)]))
            n_seg += 1
            if g.shared and j > 0:  # queries r_j; keys the prompt's, then r_j's own
                q_lens.append(len(r))
                k_index.append(torch.cat([torch.arange(p0, p0 + P), torch.arange(r0, r0 + len(r))]))
            else:  # a whole sequence [prompt | r_j]: queries and keys the same
                q_lens.append(P + len(r))
                k_index.append(torch.arange(p0, r0 + len(r)))
            k_lens.append(P + len(r))
        for i, c, r in g.pairs:
            chosen.append(first + c)
            rejected.append(first + r)
            pair_index.append(i)
    ids_t, labels, bucket_t = torch.cat(ids), torch.cat(lab), torch.cat(bucket)
    response = labels != IGNORE_INDEX  # (T,) the response tokens, responses in pack order
    n_resp = torch.tensor([len(r) for g in pack for r in g.responses])
    token_weights = torch.zeros(len(ids_t))
    token_weights[response] = torch.repeat_interleave(1.0 / n_resp.float(), n_resp)  # 1 / R_j
    scoring = Scoring(rows=torch.cat(rows), targets=labels[response],
                      weights=torch.ones(int(response.sum())),
                      segments=torch.repeat_interleave(torch.arange(n_seg), n_resp),
                      num_segments=n_seg, buckets=bucket_t[response],
                      chosen=torch.tensor(chosen),
                      rejected=torch.tensor(rejected), pair_index=pair_index)
    batch = Batch(input_ids=ids_t[None], position_ids=torch.cat(pos)[None], labels=labels[None],
                  token_weights=token_weights, bucket_ids=bucket_t,
                  bucket_names=list(bucket_names), mass=float(len(pair_index)),
                  num_examples=len(q_lens), num_tokens=len(ids_t), cu_seqlens=_offsets(q_lens),
                  max_seqlen=max(q_lens), scored=scoring)
    if sharing:
        batch.kv_index, batch.cu_seqlens_k = torch.cat(k_index), _offsets(k_lens)
        batch.max_seqlen_k = max(k_lens)
    return batch, scoring


def _offsets(lengths: list[int]) -> torch.Tensor:
    # (len + 1,) int32: 0 and the running sums, the cu_seqlens of segments of these lengths
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths).cumsum(0)
    return out
