"""Steps with a non-finite loss or gradient norm never reach the weights.

The optimizer update of such a step is skipped where it runs: fused AdamW takes a ``found_inf``
tensor (the mechanism torch's GradScaler uses) and, when it is 1, leaves parameters, moments and
step counts as they were, all on the device. So the check costs no host sync: the step's (loss,
gradient norm) pair is copied back without blocking and read once the copy has landed, at the
latest on the next logging step, before a checkpoint and at the end of training. Where the
optimizer is not fused, or under torchrun (DTensor parameters), the pair is read at once and the
update skipped on the host.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch


@dataclass
class BadStep:
    step: int
    loss: float
    grad_norm: float


class NonFiniteGuard:
    RING = 16  # pinned slots for pairs in flight

    def __init__(self, optimizer, device: torch.device, deferred: bool):
        self.optimizer = optimizer
        self.deferred = deferred and bool(optimizer.defaults.get("fused"))
        self.cuda = device.type == "cuda"
        self.pending: deque = deque()   # (step, host values, event or None)
        self.slot = 0
        if self.deferred and self.cuda:
            self.host = torch.empty(self.RING, 2, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(self.RING)]
            self.busy = [False] * self.RING

    def step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> list[BadStep]:
        """Run the optimizer update of ``step`` unless its loss or gradient norm is non-finite;
        return the bad steps known now (possibly earlier ones, never later)."""
        values = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
        if not self.deferred:
            host = values.cpu()
            if torch.isfinite(host).all():
                self.optimizer.step()
                return []
            return [BadStep(step, *host.tolist())]
        self.optimizer.found_inf = (~torch.isfinite(values)).any().float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        if not self.cuda:  # a CPU tensor is already on the host
            self.pending.append((step, values, None))
            return self.poll()
        i = self.slot
        # the ring wrapped (the device is RING steps behind): read what is in flight first
        bad = self.poll(wait=True) if self.busy[i] else []
        self.host[i].copy_(values, non_blocking=True)
        self.events[i].record()
        self.busy[i] = True
        self.pending.append((step, i, self.events[i]))
        self.slot = (i + 1) % self.RING
        return bad + self.poll()

    def poll(self, wait: bool = False, upto: int | None = None) -> list[BadStep]:
        """The bad steps among the pairs that have landed; with ``wait``, all of them (those of
        steps up to ``upto`` when given: a later step's pair is read only if it has landed)."""
        bad = []
        while self.pending:
            step, where, event = self.pending[0]
            if event is not None:
                waits = wait and (upto is None or step <= upto)
                if not waits and not event.query():
                    break
                event.synchronize()
                values = self.host[where].tolist()
                self.busy[where] = False
            else:
                values = where.tolist()
            self.pending.popleft()
            if not all(math.isfinite(v) for v in values):
                bad.append(BadStep(step, *values))
        return bad


def first_nonfinite(named_tensors) -> str | None:
    """The name of the first tensor holding a NaN or an infinity (local shards of DTensors), or
    None; one host sync."""
    names, flags = [], []
    for name, t in named_tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and t.numel():
            names.append(name)
            flags.append(torch.isfinite(t).all())
    if not flags:
        return None
    ok = torch.stack([f.to(flags[0].device) for f in flags]).cpu()
    return None if ok.all() else names[int((~ok).nonzero()[0])]
