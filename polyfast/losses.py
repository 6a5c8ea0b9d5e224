"""Objectives on top of the kernels: Bucket-Aware SFT (docs/method.md section 2) and HDPO
(section 5).

Bucket-Aware SFT, normalised over the whole optimizer step, in one place:

    L = sum_i w_b(i) * L_i / sum_i w_b(i),      L_i = mean over example i's response tokens of CE

- the mass m_i of example i: w_b(i), its bucket's weight (``data.bucket_weights``, from the TRAIN
  split at tokenisation); 1 for ``weighting: example``; T_i for ``weighting: token``
  (``data.packing.example_mass``);
- each response token's weight omega_{i,t} = m_i / T_i (``data.packing.token_weight``), carried by
  the batch's ``ScoredTokens`` with the hidden row that predicts the token (the token before it);
- a micro-batch contributes ``sum_t omega_t * CE_t`` (``bucket_sft_loss``), and the step divides by
  ``step_normalizer``, sum_i m_i over all of its micro-batches' examples (on every rank), so the
  accumulated gradient is that of L whatever the micro-batch size.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .data.packing import ScoredTokens, example_mass
from .kernels import linear_cross_entropy


def step_normalizer(examples: Iterable, weighting: str = "bucket") -> float:
    """sum_i m_i over a step's examples (a host float: no device sync)."""
    return sum(example_mass(ex, weighting) for ex in examples)


def bucket_sft_loss(hidden, weight, scored: ScoredTokens, normalizer: float, *, softcap=None,
                    backend="auto"):
    """Step-normalised Bucket-Aware SFT loss of one micro-batch.

    hidden (T, H) the trunk's output over the batch's stream (or its padded (B * L) rows),
    weight (V, H) the head, ``scored`` the batch's scored tokens, normalizer the step's
    ``step_normalizer``. Returns (loss scalar, per scored token omega_t * CE_t (N,)).
    """
    h = hidden.index_select(0, scored.rows)  # (N, H): only the rows that predict a scored token
    per_token = linear_cross_entropy(h, weight, scored.targets, scored.weights, softcap=softcap,
                                     reduction="none", backend=backend)  # (N,)
    return per_token.sum() / normalizer, per_token


def hdpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_dist, rejected_dist,
              pair_weight, chosen_tokens, *, beta=0.1, reg_lambda=0.1, ftx=0.05, label_smoothing=0.0,
              weight_sum=None, num_pairs=None):
    """HDPO (docs/method.md section 5) over a batch of P pairs; every argument but the options is
    (P,).

        h      = (pc - pr) - (rc - rr)
        l_dpo  = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        p      = sigmoid(beta (pc - pr))               (policy only)
        reg    = p * dc + (1 - p) * dr
        anchor = -(pc / Tc)
        L = sum w l_dpo / sum w + lambda * mean reg + ftx * mean anchor

    ``weight_sum`` and ``num_pairs`` are the step's totals when a step spans several micro-batches
    (default: this batch's), so that the summed micro-batch losses equal the step's loss.
    Returns (loss, metrics of detached tensors: rewards, accuracy, margin, dist_reg, anchor, dpo).
    """
    dt = torch.float64 if policy_chosen.dtype == torch.float64 else torch.float32
    pc, pr = policy_chosen.to(dt), policy_rejected.to(dt)
    rc, rr = ref_chosen.to(dt), ref_rejected.to(dt)
    w = pair_weight.to(dt)
    h = (pc - pr) - (rc - rr)
    eps = label_smoothing
    l_dpo = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    p = torch.sigmoid(beta * (pc - pr))
    reg = p * chosen_dist.to(dt) + (1 - p) * rejected_dist.to(dt)
    anchor = -pc / chosen_tokens.to(dt).clamp(min=1)
    wsum = w.sum() if weight_sum is None else weight_sum
    n = pc.numel() if num_pairs is None else num_pairs
    loss = (w * l_dpo).sum() / wsum + reg_lambda * reg.sum() / n + ftx * anchor.sum() / n
    with torch.no_grad():
        r_c, r_r = beta * (pc - rc), beta * (pr - rr)
        metrics = {"rewards_chosen": r_c, "rewards_rejected": r_r,
                   "accuracy": (r_c > r_r).float(), "margin": r_c - r_r, "dist_reg": reg.detach(),
                   "anchor": anchor.detach(), "dpo": l_dpo.detach()}
    return loss, metrics
