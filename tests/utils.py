"""Comparison helpers that say where a mismatch is."""

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (normwise relative error; 0 when both are zero)."""
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, tol: float, name: str = "tensor"):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values at {(~torch.isfinite(actual)).nonzero()[:5].tolist()}"
    err = rel_err(actual, expected)
    if err > tol:
        diff = (actual.double() - expected.double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; worst at {idx}: "
                             f"{actual[idx].item():.8g} vs {expected[idx].item():.8g}")


def step_under_cuda_autocast(trainer, monkeypatch):
    """One forward_backward of ``trainer``'s first pack on this CPU, under the autocast dtype its
    config gets on CUDA; returns (the output, the (hidden, head) dtypes that reached the loss
    head's matmuls in the torch twin)."""
    from polyfast.kernels import torch_twin

    from polyfast.model import autocast_dtype
    dtype = autocast_dtype(trainer.cfg.model, torch.device("cuda"))
    trainer.autocast = lambda: torch.autocast("cpu", dtype=dtype)
    seen = []
    real = torch_twin.chunk_logits
    monkeypatch.setattr(torch_twin, "chunk_logits",
                        lambda h, w, c: seen.append((h.dtype, w.dtype)) or real(h, w, c))
    out = trainer.forward_backward(trainer.step_packs(0)[:1])
    return out, seen


def killed_at(trainer, step: int) -> None:
    """``trainer.fit()`` stopped as by Ctrl-C when it reaches ``step`` (after that many steps)."""
    import pytest

    from polyfast.errors import Interrupted
    real = trainer.train_step

    def die(packs):
        if trainer.step == step:
            raise KeyboardInterrupt
        return real(packs)
    trainer.train_step = die
    with pytest.raises(Interrupted):
        trainer.fit()
