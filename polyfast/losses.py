"""Objectives on top of the kernels: Bucket-Aware SFT (METHOD.md section 2).

Bucket-Aware SFT, normalised over the whole optimizer step:

    L = sum_i w_b(i) * L_i / sum_i w_b(i),   L_i = mean over response tokens of CE

written with token weights omega_{i,t} = w_b(i) / T_i, so a micro-batch contributes
``sum_t omega_t * CE_t`` and the step divides by ``sum_i w_b(i)`` over all of its micro-batches.
"""

from __future__ import annotations

import torch

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
