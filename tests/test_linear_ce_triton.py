"""The Triton backend of linear_cross_entropy against the float64 full-logits reference.

On a CPU the kernels run under TRITON_INTERPRET=1 (set by conftest): fp32 and fp16 only, since the
interpreter's tl.dot is wrong for bf16; bf16 at real sizes is tests/test_linear_ce_cuda.py's job.
Shapes are small and odd: the interpreter is slow.
"""

import pytest
import torch
from polyfast.kernels import (fused_bwd, gemm, linear_ce_gemm, linear_ce_reference,
                              linear_ce_triton, linear_cross_entropy)
from polyfast.kernels import linear_ce as lce

from tests.utils import assert_close, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}

CASES = [  # N, H, V, softcap, ignore fraction, vocabulary splits
    (37, 40, 101, None, 0.2, 1),
    (37, 40, 101, None, 0.2, 3),
    (37, 40, 101, 3.0, 0.2, 2),
    (21, 8, 1, None, 0.2, None),      # V = 1, H below one block
    (40, 16, 70, 5.0, 1.0, None),     # every row ignored
    (70, 32, 45, None, 0.0, None),    # whole blocks of zero weight below
]


def make_inputs(N, H, V, ignore_frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = -100
    w = torch.rand(N, generator=g, dtype=torch.float64)
    w[torch.rand(N, generator=g) < 0.2] = 0.0
    if N >= 64:
        w[:32] = 0.0  # a row block (16 rows under the interpreter) with no gradient at all
    return hidden, weight, targets, w.float()


def _run(fn, hidden, weight, targets, w, dtype, reduction, device="cpu", **kw):
    h = hidden.detach().to(device=device, dtype=dtype).clone().requires_grad_()
    W = weight.detach().to(device=device, dtype=dtype).clone().requires_grad_()
    out = fn(h, W, targets.to(device), None if w is None else w.to(device), reduction=reduction, **kw)
    if reduction == "none":
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * grad.to(device=device, dtype=out.dtype)).sum().backward()
    else:
        out.backward()
    return [t.detach().cpu() for t in (out, h.grad, W.grad)]


@pytest.mark.slow
@pytest.mark.parametrize("N,H,V,softcap,ignore,splits", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("backend", ["triton", "gemm"])
def test_fused_backends_match_fp64_reference(N, H, V, softcap, ignore, splits, dtype, reduction,
                                             backend, monkeypatch):
    hidden, weight, targets, w = make_inputs(N, H, V, ignore)
    # the reference sees the same (rounded) inputs, so only the kernel's own error is measured
    hidden, weight = hidden.to(dtype).double(), weight.to(dtype).double()
    ref = _run(linear_ce_reference, hidden, weight, targets, w, torch.float64, reduction,
               softcap=softcap)
    if backend == "triton":  # filter off: exact; `splits` forward splits and backward slabs
        if splits:
            monkeypatch.setattr(fused_bwd, "bwd_slab_rows", lambda v, h: -(-v // splits))
        got = _run(linear_ce_triton, hidden, weight, targets, w, dtype, reduction, DEVICE,
                   softcap=softcap, num_splits=splits, filter_eps=0.0)
    else:  # `splits` (default 3) vocabulary chunks, merged as on a GPU
        monkeypatch.setattr(gemm, "gemm_chunk_cols", lambda n, v: -(-v // (splits or 3)))
        got = _run(linear_ce_gemm, hidden, weight, targets, w, dtype, reduction, DEVICE,
                   softcap=softcap)
    for name, a, e in zip(("loss", "d_hidden", "d_weight"), got, ref):
        assert_close(a, e, TOL[dtype], f"{name} ({dtype}, N={N}, H={H}, V={V}, softcap={softcap})")
    if ignore == 1.0:
        assert all(t.abs().max() == 0 for t in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_peaked_distribution_keeps_its_gradient(dtype):
    # p(target) = 0.999: p - 1 = -1e-3 must not vanish in 16-bit
    V = H = 64
    g = torch.Generator().manual_seed(0)
    weight = torch.linalg.qr(torch.randn(V, H, generator=g, dtype=torch.float64))[0]
    targets = torch.randint(0, V, (40,), generator=g)
    s = torch.log(torch.tensor(0.999 * (V - 1) / 0.001, dtype=torch.float64))
    hidden = s * weight[targets] + 1e-3 * torch.randn(40, H, generator=g, dtype=torch.float64)
    hidden, weight = hidden.to(dtype).double(), weight.to(dtype).double()
    p_target = torch.exp(-linear_ce_reference(hidden, weight, targets, reduction="none"))
    assert ((p_target > 0.997) & (p_target < 0.9995)).all()
    ref = _run(linear_ce_reference, hidden, weight, targets, None, torch.float64, "sum")
    got = _run(linear_ce_triton, hidden, weight, targets, None, dtype, "sum", DEVICE)
    # baseline: torch in the same dtype (logits in that dtype, CE in fp32)
    def same_dtype(h, W, y, w, reduction):
        return torch.nn.functional.cross_entropy((h @ W.T).float(), y, reduction=reduction)
    base = _run(same_dtype, hidden, weight, targets, None, dtype, "sum")
    for name, a, b, e in zip(("loss", "d_hidden", "d_weight"), got, base, ref):
        assert rel_err(a, e) <= 2 * rel_err(b, e) + 1e-6, (name, rel_err(a, e), rel_err(b, e))
    assert (got[1].norm(dim=1) > 0).all()


def test_frozen_inputs_get_no_gradient_work():
    hidden, weight, targets, w = make_inputs(30, 16, 50, 0.1)
    h = hidden.float().to(DEVICE).requires_grad_()
    W = weight.float().to(DEVICE)  # frozen head
    linear_ce_triton(h, W, targets.to(DEVICE), w.to(DEVICE)).backward()
    ref_h = hidden.clone().requires_grad_()
    linear_ce_reference(ref_h, weight, targets, w).backward()
    assert W.grad is None
    assert_close(h.grad.cpu(), ref_h.grad, 1e-5, "d_hidden with a frozen head")


def test_auto_backend_uses_torch_on_cpu_and_the_cost_model_on_cuda(monkeypatch):
    calls = []
    for name in ("triton", "gemm", "torch"):
        monkeypatch.setattr(lce, f"linear_ce_{name}", lambda *a, name=name, **k: calls.append(name) or 0)
    h, W, y, _ = make_inputs(8, 16, 20, 0.0)
    lce.linear_cross_entropy(h.float(), W.float(), y, backend="auto")
    assert calls == ["torch"]
    if torch.cuda.is_available():
        lce.linear_cross_entropy(h.float().cuda(), W.float().cuda(), y.cuda(), backend="auto")
        assert calls == ["torch", lce.choose_fused(8, 16, 20, 4, backward=False)]


@pytest.mark.parametrize("backend", ["triton", "gemm", "torch"])
def test_mixed_dtypes_return_gradients_in_each_inputs_dtype(backend):
    # autocast: 16-bit hidden states, an fp32 head
    hidden, weight, targets, w = make_inputs(20, 16, 40, 0.1)
    h = hidden.to(torch.float16).to(DEVICE).requires_grad_()
    W = weight.float().to(DEVICE).requires_grad_()
    out = linear_cross_entropy(h, W, targets.to(DEVICE), w.to(DEVICE), backend=backend)
    out.backward()
    assert h.grad.dtype == torch.float16 and W.grad.dtype == torch.float32
    ref_h, ref_W = hidden.to(torch.float16).double().requires_grad_(), weight.float().double().requires_grad_()
    linear_ce_reference(ref_h, ref_W, targets, w).backward()
    assert_close(h.grad.cpu(), ref_h.grad, 2e-3, "d_hidden")
    assert_close(W.grad.cpu(), ref_W.grad, 2e-3, "d_weight")


def test_bucket_sft_loss_on_triton_equals_torch_twin():
    from polyfast.data.packing import ScoredTokens
    from polyfast.losses import bucket_sft_loss
    g = torch.Generator().manual_seed(3)
    T, H, V = 90, 32, 77
    labels = torch.randint(0, V, (1, T), generator=g)
    labels[0, :20] = -100
    labels[0, 50:60] = -100
    tw = torch.rand(T, generator=g) * (labels[0] != -100)
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 4
    t = (labels[0] != -100).nonzero()[:, 0]  # the scored tokens, each predicted by the row before
    zeros = torch.zeros_like(t)
    scored = ScoredTokens(rows=t - 1, targets=labels[0, t], weights=tw[t], segments=zeros,
                          num_segments=1, buckets=zeros).to(DEVICE)
    results = []
    for backend in ("torch", "triton", "gemm"):
        h = hidden.to(DEVICE).requires_grad_()
        W = weight.to(DEVICE).requires_grad_()
        loss, per_token = bucket_sft_loss(h, W, scored, 3.0, backend=backend)
        loss.backward()
        results.append([t.detach().cpu() for t in (loss, per_token, h.grad, W.grad)])
    for other in results[1:]:
        for name, a, b in zip(("loss", "per_token", "d_hidden", "d_weight"), results[0], other):
            assert_close(b, a, 1e-5, name)


def _concentrated(N=40, H=32, V=96, hot=8, seed=0):
    """Rows whose probability sits on the first ``hot`` columns (one interpreter tile): logits 10
    to 12 there, ~0 on the rest of the vocabulary (p ~ 1e-5 each, below 2^-12 x (1 - p_y), so the
    filter skips the other tiles)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.zeros(V, H, dtype=torch.float64)
    weight[:hot, :hot] = torch.eye(hot, dtype=torch.float64)
    weight[hot:, hot:] = torch.randn(V - hot, H - hot, generator=g, dtype=torch.float64) * 0.3
    hidden = torch.zeros(N, H, dtype=torch.float64)
    hidden[:, :hot] = 12.0 * (1 - 0.2 * torch.rand(N, hot, generator=g, dtype=torch.float64))
    hidden[:, hot:] = 0.3 * torch.randn(N, H - hot, generator=g, dtype=torch.float64)
    targets = torch.randint(0, hot, (N,), generator=g)
    return hidden.half().double(), weight.half().double(), targets


def test_gradient_filter_skips_negligible_tiles_within_16bit_error():
    hidden, weight, targets = _concentrated()
    p = torch.softmax(hidden @ weight.T, dim=1)
    off_target = 1 - p.gather(1, targets[:, None])[:, 0]
    assert (p[:, 32:].max(dim=1).values < 2.0 ** -12 * off_target).all()  # tiles 2 and 3: skipped
    assert (off_target > 0.01).all()
    ref = _run(linear_ce_reference, hidden, weight, targets, None, torch.float64, "sum")
    exact = _run(linear_ce_triton, hidden, weight, targets, None, torch.float16, "sum", DEVICE,
                 filter_eps=0.0)
    filtered = _run(linear_ce_triton, hidden, weight, targets, None, torch.float16, "sum", DEVICE)
    # the filter acted: the skipped tiles' head rows got nothing, where the exact run has values
    assert (filtered[2][32:] == 0).all() and (exact[2][32:] != 0).any()
    for name, f, e, r in zip(("loss", "d_hidden", "d_weight"), filtered, exact, ref):
        assert rel_err(f, r) <= 2 * rel_err(e, r) + 2.0 ** -11, (name, rel_err(f, r), rel_err(e, r))


def test_gradient_filter_keeps_a_peaked_rows_off_target_mass():
    # p(target) = 0.999 and 63 others at ~1.6e-5 each: below the absolute 2^-12, but together as
    # large as p_y - 1; relative to the row's off-target mass they are not negligible, and stay
    V = H = 64
    g = torch.Generator().manual_seed(0)
    weight = torch.linalg.qr(torch.randn(V, H, generator=g, dtype=torch.float64))[0]
    targets = torch.randint(0, V, (40,), generator=g)
    s = torch.log(torch.tensor(0.999 * (V - 1) / 0.001, dtype=torch.float64))
    hidden = (s * weight[targets]).half().double()
    weight = weight.half().double()
    exact = _run(linear_ce_triton, hidden, weight, targets, None, torch.float16, "sum", DEVICE,
                 filter_eps=0.0)
    filtered = _run(linear_ce_triton, hidden, weight, targets, None, torch.float16, "sum", DEVICE)
    for a, b in zip(filtered, exact):
        assert torch.equal(a, b)


def test_filter_eps_must_be_a_non_negative_number():
    hidden, weight, targets, _ = make_inputs(8, 16, 20, 0.0)
    for bad in (-1e-3, float("nan")):
        with pytest.raises(ValueError, match="filter_eps"):
            linear_ce_triton(hidden.float().to(DEVICE), weight.float().to(DEVICE),
                             targets.to(DEVICE), filter_eps=bad)
