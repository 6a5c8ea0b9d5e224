"""Named ranges of a training step, for ``torch.profiler`` (``python -m polyfast.bench.profile``
reads them back to say where a step's time goes).

``phase("forward")`` is a ``record_function("polyfast/forward")`` range while a profiler runs and
a no-op otherwise (no dispatcher call per decoder layer in normal training), and inside code that
torch.compile traces (a compiled layer's attention is then found by its kernels' names). Phases
nest; work belongs to the innermost one, and a backward op to the phase its forward op ran in.
"""

from __future__ import annotations

import contextlib

import torch

PREFIX = "polyfast/"
# the phases a step is made of, in the order ``bench.profile`` reports them
NAMES = ("data", "forward", "attention", "loss_head", "reference", "backward", "optimizer")


def phase(name: str):
    """A profiler range named ``polyfast/<name>`` (``name`` one of ``NAMES``), or a no-op."""
    if name not in NAMES:
        raise ValueError(f"unknown phase {name!r} (known: {', '.join(NAMES)})")
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(PREFIX + name)
