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
