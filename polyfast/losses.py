"""Objectives on top of the kernels: Bucket-Aware SFT (METHOD.md section 2) and HDPO (section 5).

Bucket-Aware SFT, normalised over the whole optimizer step:

    L = sum_i w_b(i) * L_i / sum_i w_b(i),   L_i = mean over response tokens of CE

written with token weights omega_{i,t} = w_b(i) / T_i, so a micro-batch contributes
``sum_t omega_t * CE_t`` and the step divides by ``sum_i w_b(i)`` over all of its micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polyfast.kernels import linear_cross_entropy

IGNORE_INDEX = -100


def shift_left(x: torch.Tensor, fill) -> torch.Tensor:
    """Row-wise next-token alignment: (B, T) -> (B, T) with out[:, t] = x[:, t + 1], last = fill.

    On a packed row this crosses example boundaries only onto an example's first token, which is
    always a prompt token (label -100, weight 0), so nothing leaks between examples.
    """
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], dim=1)


def bucket_sft_loss(hidden, weight, labels, token_weights, normalizer, *, softcap=None,
                    backend="auto"):
    """Step-normalised Bucket-Aware SFT loss of one micro-batch.

    hidden (B*T, H) trunk output, weight (V, H) head, labels (B, T) unshifted (-100 = not scored),
    token_weights (B*T,) omega aligned with labels, normalizer: sum of w_b over the step's examples.
    Returns (loss scalar, per-token weighted CE (B*T,) aligned with the predicting position).
    """
    B, T = labels.shape
    targets = shift_left(labels, IGNORE_INDEX).reshape(-1)  # (B*T,)
    w = shift_left(token_weights.view(B, T), 0.0).reshape(-1)  # (B*T,)
    per_token = linear_cross_entropy(hidden, weight, targets, w, softcap=softcap,
                                     reduction="none", backend=backend)  # (B*T,)
    return per_token.sum() / normalizer, per_token


def hdpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_dist, rejected_dist,
              pair_weight, chosen_tokens, *, beta=0.1, reg_lambda=0.1, ftx=0.05, label_smoothing=0.0,
              weight_sum=None, num_pairs=None):
    """HDPO (METHOD.md section 5) over a batch of P pairs; every argument but the options is (P,).

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
