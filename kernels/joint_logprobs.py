"""Joint sequence log-probabilities of several models (policy, reference, critic) per segment.

For M models with hidden states h_m (N, H_m) and head weights W_m (V, H_m), targets y (N,) and
segment ids s (N,) (-1 = not scored):

    logp_m[t]  = softcap_m(h_m[t] @ W_m^T)[y_t] - logsumexp(softcap_m(h_m[t] @ W_m^T))
    sums[m, k] = sum_{t: s_t = k} logp_m[t],      counts[k] = #{t: s_t = k}

HDPO needs exactly these (M, S) sums: chosen/rejected log-probs of the policy, of the frozen
reference and of an LM critic, for every pair in a pack. Gradients flow only to the models whose
hidden states or weights require grad (the policy); frozen models run without autograd.

Backends, chosen per call:
- "torch": per model, the chunked linear cross-entropy twin (no (N, V) logits) with reduction
  "none", then a segment scatter-add; frozen models under no_grad. The CPU production path.
- "reference": full log-softmax per model in fp32 (fp64 for fp64 inputs), then the scatter-add: the
  oracle of tests and benchmarks.
- "auto": "torch" (the single-sweep Triton kernel is a later release).

Shapes: hiddens[m] (N, H_m), weights[m] (V, H_m), targets (N,), segment_ids (N,) int.
Returns logp_sums (M, S) fp32 (fp64 under the fp64 reference), token_counts (S,) int64 and, with
``return_token_logprobs``, the per-token log-probs (M, N) (0 where not scored).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .linear_ce import linear_ce_reference, linear_ce_torch

BACKENDS = ("auto", "torch", "reference")
IGNORE_INDEX = -100


def _check(hiddens, weights, targets, segment_ids, softcaps, requires_grad):
    M = len(hiddens)
    if M == 0 or len(weights) != M:
        raise ValueError(f"need one weight per hidden, got {M} hiddens and {len(weights)} weights")
    N = targets.shape[0]
    for m, (h, w) in enumerate(zip(hiddens, weights)):
        if h.shape[0] != N or h.shape[1] != w.shape[1] or w.shape[0] != weights[0].shape[0]:
            raise ValueError(f"model {m}: hidden {tuple(h.shape)} / weight {tuple(w.shape)} do not "
                             f"fit N={N}, V={weights[0].shape[0]}")
    if segment_ids.shape != targets.shape:
        raise ValueError(f"segment_ids {tuple(segment_ids.shape)} != targets {tuple(targets.shape)}")
    for name, seq in (("softcaps", softcaps), ("requires_grad", requires_grad)):
        if seq is not None and len(seq) != M:
            raise ValueError(f"{name} needs one entry per model ({M}), got {len(seq)}")


def _token_logprobs(fn, h, w, targets, softcap):
    # -(CE) per token, 0 on ignored rows; (N,)
    return -fn(h, w, targets, softcap=softcap, reduction="none")


def joint_logprobs(hiddens: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], targets,
                   segment_ids, num_segments: int, *, softcaps=None, requires_grad=None,
                   backend: str = "auto", return_token_logprobs: bool = False):
    """Per-segment sums of per-token log-probs for M models; see the module docstring.

    ``requires_grad[m]`` (default: whether model m's hidden or weight requires grad) decides which
    models get a backward graph.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check(hiddens, weights, targets, segment_ids, softcaps, requires_grad)
    M = len(hiddens)
    softcaps = list(softcaps) if softcaps is not None else [None] * M
    if requires_grad is None:
        requires_grad = [h.requires_grad or w.requires_grad for h, w in zip(hiddens, weights)]
    scored = segment_ids >= 0
    t = torch.where(scored, targets, IGNORE_INDEX)
    seg = torch.where(scored, segment_ids, 0).long()
    fn = linear_ce_reference if backend == "reference" else linear_ce_torch
    per_token = []
    for h, w, cap, grad in zip(hiddens, weights, softcaps, requires_grad):
        if grad:
            per_token.append(_token_logprobs(fn, h, w, t, cap))
        else:
            with torch.no_grad():
                per_token.append(_token_logprobs(fn, h.detach(), w.detach(), t, cap))
    token_lp = torch.stack(per_token)  # (M, N)
    sums = token_lp.new_zeros(M, num_segments).index_add(1, seg, token_lp)  # (M, S)
    counts = torch.zeros(num_segments, dtype=torch.int64, device=targets.device)
    counts.index_add_(0, seg, scored.long())
    if return_token_logprobs:
        return sums, counts, token_lp
    return sums, counts


def joint_logprobs_reference(hiddens, weights, targets, segment_ids, num_segments, **kw):
    """The full-logits oracle (same as ``backend="reference"``)."""
    return joint_logprobs(hiddens, weights, targets, segment_ids, num_segments, backend="reference",
                          **kw)
