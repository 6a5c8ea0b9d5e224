"""CUDA-only checks of the Triton backend: bf16 at real sizes, no host syncs. Skipped without a GPU."""

import pytest
import torch

from polyfast.kernels import linear_ce_reference, linear_ce_triton
from tests.utils import rel_err

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ATOL = {torch.bfloat16: 1e-6, torch.float16: 1e-6, torch.float32: 1e-7}


def _grads(fn, hidden, weight, targets, w, dtype, **kw):
    h = hidden.detach().to(dtype).clone().requires_grad_()
    W = weight.detach().to(dtype).clone().requires_grad_()
    out = fn(h, W, targets, w, **kw)
    out.backward()
    return out.detach(), h.grad, W.grad


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_real_size_against_fp64_reference(softcap):
    # Qwen2.5-shaped head: N=4096 tokens, H=2048, V=151936
    N, H, V = 4096, 2048, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, H, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(V, H, device="cuda", generator=g) / H ** 0.5 * 4).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    targets[::5] = -100
    w = torch.rand(N, device="cuda", generator=g)
    ref = _grads(linear_ce_reference, hidden.double(), weight.double(), targets, w, torch.float64,
                 softcap=softcap)
    got = _grads(linear_ce_triton, hidden, weight, targets, w, torch.bfloat16, softcap=softcap)

    def same_dtype(h, W, y, w, softcap=None):  # the baseline: torch in bf16, CE in fp32
        z = (h @ W.T).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
        return (ce * w).sum()
    base = _grads(same_dtype, hidden, weight, targets, w, torch.bfloat16, softcap=softcap)
    for name, a, b, e in zip(("loss", "d_hidden", "d_weight"), got, base, ref):
        ea, eb = rel_err(a, e), rel_err(b, e)
        print(f"{name}: triton {ea:.2e}, torch bf16 {eb:.2e}")
        assert ea <= 2 * eb + ATOL[torch.bfloat16], (name, ea, eb)


def test_no_host_sync_inside_the_call():
    N, H, V = 1000, 256, 5003
    hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (N,), device="cuda")
    linear_ce_triton(hidden, weight, targets).backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        linear_ce_triton(hidden, weight, targets).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_large_hidden_size_fp32():
    N, H, V = 300, 8192, 1001  # H up to 8192, N and V off the block sizes
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(N, H, device="cuda", generator=g, dtype=torch.float64) / 8
    weight = torch.randn(V, H, device="cuda", generator=g, dtype=torch.float64) / 8
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    ref = _grads(linear_ce_reference, hidden, weight, targets, None, torch.float64)
    got = _grads(linear_ce_triton, hidden, weight, targets, None, torch.float32)
    for name, a, e in zip(("loss", "d_hidden", "d_weight"), got, ref):
        assert rel_err(a, e) <= 1e-5, (name, rel_err(a, e))
