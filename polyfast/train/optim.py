"""AdamW (fused where the device supports it) and a warmup + cosine schedule (torch's LambdaLR)."""

from __future__ import annotations

import math

import torch


def build_optimizer(model, lr: float, weight_decay: float, betas) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)
    except (RuntimeError, TypeError, ValueError):  # the device has no fused AdamW
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), foreach=True)


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
