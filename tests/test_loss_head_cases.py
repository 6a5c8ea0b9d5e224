"""The loss head's hard cases, on every backend, against a float64 full-logits oracle (loss and
both gradients): huge logits on rows without gradient, strided ids and weights, N = 0, bad ids,
tied embeddings, fp16, softcap, differentiable token weights, the compute dtype under autocast.

The Triton kernels run under TRITON_INTERPRET=1 on a CPU (set by conftest), so shapes are small.
"""

import pytest
import torch
from polyfast.kernels import (checks, fused_fwd, gemm, joint_logprobs, linear_cross_entropy,
                              torch_twin)

from tests.test_linear_ce_triton import make_inputs
from tests.utils import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "torch", "triton", "gemm"]
JOINT_BACKENDS = ["reference", "torch", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _data(N=37, H=24, V=61, seed=0, ignore=0.3):
    # float64 hidden and head, targets with a share ignored, fp32 token weights (a fifth of them 0)
    return make_inputs(N, H, V, ignore, seed)


def _ce(backend, hidden, weight, targets, w, dtype, softcap=None, grad_w=False, reduction="sum"):
    """(loss, d_hidden, d_weight, d_token_weights) of one backend, on the test device."""
    h = hidden.detach().to(DEVICE, dtype).requires_grad_()
    W = weight.detach().to(DEVICE, dtype).requires_grad_()
    tw = None if w is None else w.detach().to(DEVICE, torch.float32 if dtype != torch.float64
                                              else torch.float64).requires_grad_(grad_w)
    out = linear_cross_entropy(h, W, targets.to(DEVICE), tw, softcap=softcap, backend=backend,
                               reduction=reduction)
    coef = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out * coef.to(DEVICE, out.dtype)).sum().backward() if reduction == "none" else out.backward()
    return [None if t is None else t.detach().cpu()
            for t in (out, h.grad, W.grad, tw.grad if grad_w else None)]


def _oracle(hidden, weight, targets, w, softcap=None, grad_w=False, reduction="sum"):
    """The same four in float64 through the reference on rounded-to-dtype inputs."""
    return _ce("reference", hidden, weight, targets, w, torch.float64, softcap, grad_w, reduction)


def _compare(got, ref, tol, what):
    for name, a, e in zip(("loss", "d_hidden", "d_weight", "d_token_weights"), got, ref):
        if e is not None:
            assert_close(a.double(), e, tol, f"{name} ({what})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_huge_logits_on_rows_without_gradient(backend, softcap):
    # rows that are ignored or weigh 0 have logits far above exp's fp32 range (88.7): they must
    # contribute exact zeros, not inf * 0 = NaN spread through the atomics into all of dW
    hidden, weight, targets, w = _data(seed=1)
    big = torch.arange(37) % 3 == 0
    hidden[big] *= 400.0 / hidden[big].norm(dim=1, keepdim=True) * weight.shape[1] ** 0.5
    targets[big & (torch.arange(37) % 2 == 0)] = -100
    w[big & (torch.arange(37) % 2 == 1)] = 0.0
    assert (hidden[big] @ weight.T).max() > 200
    ref = _oracle(hidden, weight, targets, w, softcap)
    got = _ce(backend, hidden, weight, targets, w, torch.float32, softcap)
    _compare(got, ref, TOL[torch.float32], f"{backend}, softcap={softcap}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_targets_and_weights_are_read_by_stride(backend):
    hidden, weight, targets, w = _data(seed=2)
    # every second entry of a twice-as-long buffer: the kernels must not read them as contiguous
    t2 = torch.full((74,), 7)
    t2[::2] = targets
    w2 = torch.zeros(74)
    w2[::2] = w
    assert not t2[::2].is_contiguous()
    ref = _oracle(hidden, weight, targets, w)
    got = _ce(backend, hidden, weight, t2[::2], w2[::2], torch.float32)
    _compare(got, ref, TOL[torch.float32], backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_hidden_and_head(backend):
    # a column slice of a wider hidden (row stride 40, H = 24) and a transposed-back head
    hidden, weight, targets, w = _data(seed=3)
    wide = torch.randn(37, 40, dtype=torch.float64)
    wide[:, 5:29] = hidden
    h = wide[:, 5:29].float().to(DEVICE).requires_grad_()
    W = weight.T.contiguous().T.float().to(DEVICE).requires_grad_()
    out = linear_cross_entropy(h, W, targets.to(DEVICE), w.float().to(DEVICE), backend=backend)
    out.backward()
    ref = _oracle(hidden, weight, targets, w)
    _compare([out.detach().cpu(), h.grad.cpu(), W.grad.cpu()], ref, TOL[torch.float32], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_no_tokens(backend, reduction):
    h = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    W = torch.randn(30, 16, device=DEVICE, requires_grad=True)
    out = linear_cross_entropy(h, W, torch.zeros(0, dtype=torch.long, device=DEVICE),
                               backend=backend, reduction=reduction)
    assert out.shape == (() if reduction == "sum" else (0,))
    out.sum().backward()
    assert out.sum().item() == 0
    assert h.grad.shape == (0, 16)
    assert W.grad is None or (W.grad.shape == (30, 16) and W.grad.abs().max() == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_targets_raise_naming_the_row(backend):
    hidden, weight, targets, w = _data(seed=4)
    for bad in (61, 1000, -1):  # V = 61; -1 is not the ignore index
        t = targets.clone()
        t[11] = bad
        with pytest.raises(ValueError, match=r"targets.*\[11\] = " + str(bad)):
            linear_cross_entropy(hidden.float().to(DEVICE), weight.float().to(DEVICE),
                                 t.to(DEVICE), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_targets_poison_without_the_check(backend, monkeypatch):
    # what a CUDA run does by default (no host sync): NaN loss and gradients, never a finite
    # wrong value or an out-of-bounds access
    monkeypatch.setenv("POLYFAST_CHECK_IDS", "0")
    hidden, weight, targets, w = _data(seed=4)
    targets[11] = 61
    got = _ce(backend, hidden, weight, targets, w, torch.float32)
    assert torch.isnan(got[0]) and torch.isnan(got[1][11]).all() and torch.isnan(got[2]).any()
    # the other rows' hidden gradients are untouched
    rest = torch.arange(37) != 11
    targets[11] = -100
    clean = _oracle(hidden, weight, targets, w)
    assert_close(got[1][rest].double(), clean[1][rest], TOL[torch.float32], "other rows")


def test_ignore_index_other_than_minus_100():
    hidden, weight, targets, w = _data(seed=5)
    t = torch.where(targets == -100, 61, targets)  # ignore_index = V is not "out of range"
    ref = _oracle(hidden, weight, targets, w)
    for backend in BACKENDS:
        out = linear_cross_entropy(hidden.float().to(DEVICE), weight.float().to(DEVICE),
                                   t.to(DEVICE), w.float().to(DEVICE), ignore_index=61,
                                   backend=backend)
        assert_close(out.cpu().double(), ref[0], 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embeddings(backend):
    # the head is the input embedding: both paths' gradients reach the one weight
    V, H, N = 53, 24, 31
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (N,), generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[:5] = -100
    grads = []
    for b, dtype in ((backend, torch.float32), ("reference", torch.float64)):
        E = emb.to(DEVICE, dtype).requires_grad_()
        hidden = torch.tanh(E[ids.to(DEVICE)]) * 3  # (N, H) from the same weight
        linear_cross_entropy(hidden, E, targets.to(DEVICE), backend=b).backward()
        grads.append(E.grad.cpu())
    assert_close(grads[0].double(), grads[1], 1e-5, f"tied d_weight ({backend})")


@pytest.mark.parametrize("backend", ["torch", "triton", "gemm"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fp16(backend, softcap):
    hidden, weight, targets, w = _data(seed=7)
    hidden, weight = hidden.half().double(), weight.half().double()  # the kernels' own error only
    ref = _oracle(hidden, weight, targets, w, softcap)
    got = _ce(backend, hidden, weight, targets, w, torch.float16, softcap)
    assert got[1].dtype == torch.float16 and got[2].dtype == torch.float16
    _compare(got, ref, TOL[torch.float16], f"{backend} fp16")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_token_weights_are_differentiable(backend, reduction):
    # d loss / d w_t = grad_out_t * CE_t (0 on ignored rows), on every backend
    hidden, weight, targets, w = _data(seed=8)
    ref = _oracle(hidden, weight, targets, w, softcap=2.0, grad_w=True, reduction=reduction)
    got = _ce(backend, hidden, weight, targets, w, torch.float32, softcap=2.0, grad_w=True,
              reduction=reduction)
    _compare(got, ref, TOL[torch.float32], backend)
    assert (got[3][targets == -100] == 0).all()


def test_compute_dtype_rules():
    f32 = torch.zeros(2, 2)
    bf, half, f64 = f32.bfloat16(), f32.half(), f32.double()
    assert checks.compute_dtype(f32, f32) == torch.float32
    assert checks.compute_dtype(bf, f32) == torch.bfloat16   # the 16-bit side of a mix
    assert checks.compute_dtype(f32, half) == torch.float16
    assert checks.compute_dtype(f64, f64) == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert checks.compute_dtype(f32, f32) == torch.bfloat16
        assert checks.compute_dtype(f64, f64) == torch.float64  # autocast leaves fp64 alone
    with pytest.raises(ValueError, match="bfloat16 and float16"):
        checks.compute_dtype(bf, half)
    with pytest.raises(ValueError, match="float64"):
        checks.compute_dtype(f64, f32)
    with pytest.raises(ValueError, match="floating point"):
        checks.compute_dtype(f32, torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("backend", ["torch", "triton", "gemm"])
def test_autocast_runs_the_head_in_its_dtype(backend, monkeypatch):
    # fp32 hidden states and head (what HF models give under autocast) reach the matmuls as the
    # autocast dtype; the gradients come back fp32 and close to the oracle's
    seen = []
    if backend == "torch":
        real = torch_twin.chunk_logits
        monkeypatch.setattr(torch_twin, "chunk_logits", lambda h, w, c: seen.append((h.dtype, w.dtype))
                            or real(h, w, c))
    else:
        module, name = (fused_fwd, "launch_fwd") if backend == "triton" else (gemm, "forward")
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda h, w, *a: seen.append((h.dtype, w.dtype))
                            or real(h, w, *a))
    hidden, weight, targets, w = _data(seed=9)
    hidden, weight = hidden.half().double(), weight.half().double()
    h = hidden.float().to(DEVICE).requires_grad_()
    W = weight.float().to(DEVICE).requires_grad_()
    with torch.autocast(h.device.type, dtype=torch.float16):
        out = linear_cross_entropy(h, W, targets.to(DEVICE), w.float().to(DEVICE), backend=backend)
    out.backward()
    assert seen and set(seen) == {(torch.float16, torch.float16)}
    assert out.dtype == torch.float32 and h.grad.dtype == W.grad.dtype == torch.float32
    ref = _oracle(hidden, weight, targets, w)
    _compare([out.detach().cpu(), h.grad.cpu(), W.grad.cpu()], ref, TOL[torch.float16], backend)


# --- joint_logprobs -----------------------------------------------------------------------------


def _joint_inputs(N=41, V=47, S=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = (24, 16)
    hs = [torch.randn(N, H, generator=g, dtype=torch.float64) for H in sizes]
    ws = [torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2 for H in sizes]
    targets = torch.randint(0, V, (N,), generator=g)
    seg = torch.sort(torch.randint(0, S, (N,), generator=g)).values
    seg[:6] = -1
    seg[17:20] = -1
    return hs, ws, targets, seg, S


def _joint(backend, hs, ws, targets, seg, S, dtype=torch.float32, softcaps=None):
    h = [x.detach().to(DEVICE, dtype).requires_grad_(m == 0) for m, x in enumerate(hs)]
    w = [x.detach().to(DEVICE, dtype).requires_grad_(m == 0) for m, x in enumerate(ws)]
    sums, counts = joint_logprobs(h, w, targets.to(DEVICE), seg.to(DEVICE), S, softcaps=softcaps,
                                  backend=backend)
    coef = torch.linspace(-1, 2, sums.numel(), dtype=torch.float64).reshape(sums.shape)
    (sums.double() * coef.to(DEVICE)).sum().backward()
    return sums.detach().cpu(), counts.cpu(), h[0].grad.cpu(), w[0].grad.cpu()


@pytest.mark.parametrize("backend", JOINT_BACKENDS)
def test_joint_huge_logits_on_prompt_rows_and_strided_ids(backend):
    hs, ws, targets, seg, S = _joint_inputs(seed=1)
    prompt = seg < 0
    for h in hs:  # prompt rows (no gradient) with logits far above exp's fp32 range
        h[prompt] *= 300.0 / h[prompt].norm(dim=1, keepdim=True) * h.shape[1] ** 0.5
    t2, s2 = torch.zeros(82, dtype=torch.long), torch.zeros(82, dtype=torch.long)
    t2[1::2], s2[1::2] = targets, seg
    ref = _joint("reference", hs, ws, targets, seg, S, torch.float64, [None, 5.0])
    got = _joint(backend, hs, ws, t2[1::2], s2[1::2], S, softcaps=[None, 5.0])
    for name, a, e in zip(("sums", "counts", "d_hidden", "d_weight"), got, ref):
        assert_close(a.double(), e.double(), 1e-5, f"{name} ({backend})")


@pytest.mark.parametrize("backend", JOINT_BACKENDS)
def test_joint_no_tokens(backend):
    h = [torch.zeros(0, 16, device=DEVICE, requires_grad=True)]
    w = [torch.randn(20, 16, device=DEVICE)]
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    sums, counts = joint_logprobs(h, w, empty, empty, 3, backend=backend)
    assert sums.shape == (1, 3) and (sums == 0).all() and counts.tolist() == [0, 0, 0]
    sums.sum().backward()
    assert h[0].grad.shape == (0, 16)


@pytest.mark.parametrize("backend", JOINT_BACKENDS)
def test_joint_bad_ids(backend, monkeypatch):
    hs, ws, targets, seg, S = _joint_inputs(seed=2)
    args = ([x.float().to(DEVICE) for x in hs], [x.float().to(DEVICE) for x in ws])
    bad_seg = seg.clone()
    bad_seg[30] = S  # one past the last segment
    with pytest.raises(ValueError, match=r"segment_ids\[30\] = 6"):
        joint_logprobs(*args, targets.to(DEVICE), bad_seg.to(DEVICE), S, backend=backend)
    bad_t = targets.clone()
    bad_t[25] = 47
    bad_t[2] = 10_000  # a prompt row's target is never read: fine
    with pytest.raises(ValueError, match=r"targets.*\[25\] = 47"):
        joint_logprobs(*args, bad_t.to(DEVICE), seg.to(DEVICE), S, backend=backend)
    # with the check off (a CUDA run's default): NaN, no out-of-bounds write
    monkeypatch.setenv("POLYFAST_CHECK_IDS", "0")
    sums, _ = joint_logprobs(*args, targets.to(DEVICE), bad_seg.to(DEVICE), S, backend=backend)
    assert torch.isnan(sums).all()
    sums, _ = joint_logprobs(*args, bad_t.to(DEVICE), seg.to(DEVICE), S, backend=backend)
    assert torch.isnan(sums[:, seg[25]]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_joint_fp16_under_autocast_with_fp32_models(backend):
    hs, ws, targets, seg, S = _joint_inputs(seed=3)
    hs, ws = [x.half().double() for x in hs], [x.half().double() for x in ws]
    ref = _joint("reference", hs, ws, targets, seg, S, torch.float64)
    with torch.autocast(DEVICE, dtype=torch.float16):
        got = _joint(backend, hs, ws, targets, seg, S, torch.float32)
    assert got[2].dtype == torch.float32
    for name, a, e in zip(("sums", "counts", "d_hidden", "d_weight"), got, ref):
        assert_close(a.double(), e.double(), 2e-3, f"{name} ({backend})")
