"""CUDA-only checks of the fused backends ("triton", exact and filtered, and "gemm"): bf16 at real
sizes, no host syncs. Skipped without a GPU."""

import pytest
import torch
from polyfast.kernels import linear_ce_gemm, linear_ce_reference, linear_ce_triton

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


def _same_dtype(h, W, y, w, softcap=None):
    # the baseline: torch in the inputs' dtype (bf16 logits), CE in fp32
    z = (h @ W.T).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    return ce.sum() if w is None else (ce * w).sum()


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
    base = _grads(_same_dtype, hidden, weight, targets, w, torch.bfloat16, softcap=softcap)
    bad = []
    for label, fn, kw in (("triton exact", linear_ce_triton, {"filter_eps": 0.0}),
                          ("triton filtered", linear_ce_triton, {}),
                          ("gemm", linear_ce_gemm, {})):
        got = _grads(fn, hidden, weight, targets, w, torch.bfloat16, softcap=softcap, **kw)
        for name, a, b, e in zip(("loss", "d_hidden", "d_weight"), got, base, ref):
            ea, eb = rel_err(a, e), rel_err(b, e)
            print(f"{label} {name}: {ea:.2e}, torch bf16 {eb:.2e}")
            if not ea <= 2 * eb + ATOL[torch.bfloat16]:
                bad.append((label, name, ea, eb))
    assert not bad, bad


def test_no_host_sync_inside_the_call():
    N, H, V = 1000, 256, 5003
    hidden = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (N,), device="cuda")
    for fn in (linear_ce_triton, linear_ce_gemm):
        fn(hidden, weight, targets).backward()  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn(hidden, weight, targets).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_large_hidden_size_fp32():
    N, H, V = 300, 8192, 1001  # H up to 8192, N and V off the block sizes
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(N, H, device="cuda", generator=g, dtype=torch.float64) / 8
    weight = torch.randn(V, H, device="cuda", generator=g, dtype=torch.float64) / 8
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    ref = _grads(linear_ce_reference, hidden, weight, targets, None, torch.float64)
    for fn in (linear_ce_triton, linear_ce_gemm):
        got = _grads(fn, hidden, weight, targets, None, torch.float32)
        for name, a, e in zip(("loss", "d_hidden", "d_weight"), got, ref):
            assert rel_err(a, e) <= 1e-5, (fn.__name__, name, rel_err(a, e))


def test_autocast_takes_fp32_inputs_to_bf16_kernels_and_keeps_a_bf16_head_uncopied(monkeypatch):
    # model.dtype auto: fp32 hidden states and head under bf16 autocast reach the kernels as bf16;
    # a bf16 head (model.dtype bfloat16) reaches them as itself, with no copy
    from polyfast.kernels import fused_fwd
    seen = []
    real = fused_fwd.launch_fwd
    monkeypatch.setattr(fused_fwd, "launch_fwd", lambda h, w, *a: seen.append((h.dtype, w)) or real(h, w, *a))
    N, H, V = 2048, 1536, 32000
    hidden = torch.randn(N, H, device="cuda", requires_grad=True)
    weight = (torch.randn(V, H, device="cuda") / H ** 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_ce_triton(hidden, weight, targets)
    loss.backward()
    assert seen[-1][0] == torch.bfloat16 and seen[-1][1].dtype == torch.bfloat16
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    ref = linear_ce_reference(hidden.detach().bfloat16().double(), weight.detach().bfloat16().double(),
                              targets)
    assert rel_err(loss.detach(), ref) < 1e-3
    w16 = weight.detach().bfloat16().requires_grad_()
    linear_ce_triton(hidden.detach().bfloat16(), w16, targets).backward()
    assert seen[-1][1].data_ptr() == w16.data_ptr()  # the head itself, not a copy
    assert w16.grad.dtype == torch.bfloat16


def test_bf16_huge_logits_on_ignored_rows_keep_gradients_finite():
    N, H, V = 4096, 1024, 50000
    g = torch.Generator(device="cuda").manual_seed(2)
    hidden = torch.randn(N, H, device="cuda", generator=g)
    weight = torch.randn(V, H, device="cuda", generator=g) / H ** 0.5
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    targets[: N // 2] = -100  # the prompt half...
    hidden[: N // 2] *= 20  # ...with logits far above exp's fp32 range
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    assert (hidden[:64].float() @ weight.float().T).max() > 100
    got = _grads(linear_ce_triton, hidden, weight, targets, None, torch.bfloat16)
    assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    assert got[1][: N // 2].abs().max() == 0
    ref = _grads(linear_ce_reference, hidden.double(), weight.double(), targets, None, torch.float64)
    base = _grads(_same_dtype, hidden, weight, targets, None, torch.bfloat16)
    for name, a, b, e in zip(("loss", "d_hidden", "d_weight"), got, base, ref):
        ea, eb = rel_err(a, e), rel_err(b, e)
        assert ea <= 2 * eb + ATOL[torch.bfloat16], (name, ea, eb)
