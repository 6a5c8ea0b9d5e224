"""joint_logprobs against a float64 full log-softmax per model, then a per-segment sum."""

import pytest
import torch

from polyfast.kernels import joint_logprobs
from tests.utils import assert_close


def _oracle(hiddens, weights, targets, segs, S, softcaps):
    out = []
    for h, w, cap in zip(hiddens, weights, softcaps):
        z = h.double() @ w.double().T
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        lp = torch.log_softmax(z, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
        out.append(torch.stack([lp[segs == k].sum() for k in range(S)]))
    return torch.stack(out)


@pytest.mark.parametrize("M", [1, 2, 3])
def test_sums_and_gradients_match_the_oracle(M):
    g = torch.Generator().manual_seed(M)
    N, V, S = 61, 83, 7
    sizes = [24, 16, 40][:M]  # a smaller critic, a wider reference
    softcaps = [None, 4.0, None][:M]
    hiddens = [torch.randn(N, H, generator=g, dtype=torch.float64) for H in sizes]
    weights = [torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 for H in sizes]
    targets = torch.randint(0, V, (N,), generator=g)
    segs = torch.randint(-1, S, (N,), generator=g)
    segs[5] = 6
    segs[segs == 6] = -1
    segs[5] = 6  # a single-token segment
    for backend in ("torch", "separate", "reference"):
        hs = [h.float().clone().requires_grad_(m == 0) for m, h in enumerate(hiddens)]
        ws = [w.float().clone().requires_grad_(m == 0) for m, w in enumerate(weights)]
        sums, counts = joint_logprobs(hs, ws, targets, segs, S, softcaps=softcaps, backend=backend)
        ref_h = [h.clone().requires_grad_(m == 0) for m, h in enumerate(hiddens)]
        ref_w = [w.clone().requires_grad_(m == 0) for m, w in enumerate(weights)]
        ref = _oracle(ref_h, ref_w, targets, segs, S, softcaps)
        assert_close(sums, ref, 1e-5, f"sums ({backend}, M={M})")
        assert counts.tolist() == [(segs == k).sum().item() for k in range(S)]
        coef = torch.randn(M, S, generator=g, dtype=torch.float64)
        (sums.double() * coef).sum().backward()
        (ref * coef).sum().backward()
        assert_close(hs[0].grad, ref_h[0].grad, 1e-5, f"d_hidden ({backend})")
        assert_close(ws[0].grad, ref_w[0].grad, 1e-5, f"d_weight ({backend})")
        assert all(h.grad is None for h in hs[1:]) and all(w.grad is None for w in ws[1:])


def test_token_logprobs_and_unscored_tokens():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(10, 8, generator=g), torch.randn(20, 8, generator=g)
    targets = torch.randint(0, 20, (10,), generator=g)
    segs = torch.tensor([-1, -1, 0, 0, 0, -1, 1, 1, -1, -1])
    sums, counts, tok = joint_logprobs([h], [w], targets, segs, 2, return_token_logprobs=True)
    assert tok.shape == (1, 10) and (tok[0, segs < 0] == 0).all() and (tok[0, segs >= 0] < 0).all()
    assert_close(sums[0], torch.stack([tok[0, 2:5].sum(), tok[0, 6:8].sum()]), 1e-6, "sums")
    assert counts.tolist() == [3, 2]


def test_shape_errors():
    h, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="one weight per hidden"):
        joint_logprobs([h, h], [w], torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="segment_ids"):
        joint_logprobs([h], [w], torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long), 1)


# --- the Triton backend (under TRITON_INTERPRET=1 on a CPU) -----------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("M", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("splits,backward", [(None, "triton"), (3, "triton"), (2, "gemm")])
def test_triton_sums_and_gradients_match_the_oracle(M, dtype, splits, backward):
    from polyfast.kernels import joint_logprobs_triton
    g = torch.Generator().manual_seed(10 + M)
    N, V, S = 45, 71, 9
    sizes = [32, 16, 40][:M]
    softcaps = [None, 4.0, 6.0][:M]
    hiddens = [torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).double() for H in sizes]
    weights = [(torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype).double()
               for H in sizes]
    targets = torch.randint(0, V, (N,), generator=g)
    segs = torch.sort(torch.randint(0, S - 1, (N,), generator=g)).values  # contiguous runs
    segs[:7] = -1  # a prompt
    segs[20:23] = -1
    segs[-1] = S - 1  # a single-token segment
    hs = [h.to(DEVICE, dtype).requires_grad_(m == 0) for m, h in enumerate(hiddens)]
    ws = [w.to(DEVICE, dtype).requires_grad_(m == 0) for m, w in enumerate(weights)]
    # vocabulary splits merged after the launch; the policy's backward exact (filter off)
    sums, counts, tok = joint_logprobs_triton(hs, ws, targets.to(DEVICE), segs.to(DEVICE), S,
                                              softcaps=softcaps, return_token_logprobs=True,
                                              num_splits=splits, backward=backward,
                                              filter_eps=0.0)
    ref_h = [h.clone().requires_grad_(m == 0) for m, h in enumerate(hiddens)]
    ref_w = [w.clone().requires_grad_(m == 0) for m, w in enumerate(weights)]
    ref = _oracle(ref_h, ref_w, targets, segs, S, softcaps)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert_close(sums.cpu(), ref, tol, f"sums (M={M}, {dtype})")
    assert counts.cpu().tolist() == [(segs == k).sum().item() for k in range(S)]
    assert (tok.cpu()[:, segs < 0] == 0).all()
    coef = torch.randn(M, S, generator=g, dtype=torch.float64)
    (sums.double() * coef.to(DEVICE)).sum().backward()
    (ref * coef).sum().backward()
    assert_close(hs[0].grad.cpu(), ref_h[0].grad, tol, "d_hidden")
    assert_close(ws[0].grad.cpu(), ref_w[0].grad, tol, "d_weight")
    assert all(h.grad is None for h in hs[1:]) and all(w.grad is None for w in ws[1:])


def test_triton_token_logprobs_carry_gradients_too():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(30, 16, generator=g)
    w = torch.randn(40, 16, generator=g) / 4
    y = torch.randint(0, 40, (30,), generator=g)
    seg = torch.tensor([-1] * 5 + [0] * 10 + [1] * 15)
    grads = []
    for fn in ("triton", "torch"):
        hh = h.clone().to(DEVICE).requires_grad_()
        sums, _, tok = joint_logprobs([hh], [w.to(DEVICE)], y.to(DEVICE), seg.to(DEVICE), 2,
                                      backend=fn, return_token_logprobs=True)
        (sums.sum() * 0.5 + (tok ** 2).sum()).backward()
        grads.append(hh.grad.cpu())
    assert_close(grads[0], grads[1], 1e-5, "d_hidden through sums and token log-probs")


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_shared_head_sweeps_it_once_for_policy_and_reference(M, dtype, monkeypatch):
    """LoRA: the policy and its adapters-off reference read one frozen head (the same tensor);
    the launch sweeps it once for both, with the oracle's sums and the policy's d_hidden."""
    import importlib
    jl = importlib.import_module("polyfast.kernels.joint_logprobs")
    launches = []
    real = jl._launch_joint_fwd

    def spy(*args, **kwargs):
        launches.append(args[-1] if len(args) > 7 else kwargs.get("shared_head", False))
        return real(*args, **kwargs)
    monkeypatch.setattr(jl, "_launch_joint_fwd", spy)
    g = torch.Generator().manual_seed(30 + M)
    N, V, S, H = 39, 67, 6, 24
    head = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype).double()
    hiddens = [torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).double()
               for _ in range(M)]
    weights = [head, head, (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).double()][:M]
    softcaps = [None, None, 5.0][:M]
    targets = torch.randint(0, V, (N,), generator=g)
    segs = torch.sort(torch.randint(-1, S, (N,), generator=g)).values
    frozen = head.to(DEVICE, dtype)  # one tensor, no gradient: LoRA's frozen head
    ws = [frozen, frozen, weights[-1].to(DEVICE, dtype)][:M]
    out = {}
    for shared in (True, False):
        hs = [h.to(DEVICE, dtype).requires_grad_(m == 0) for m, h in enumerate(hiddens)]
        sums, _ = jl.joint_logprobs_triton(hs, ws, targets.to(DEVICE), segs.to(DEVICE), S,
                                           softcaps=softcaps, requires_grad=[True] + [False] * (M - 1),
                                           shared_head=shared, filter_eps=0.0)
        sums[0].sum().backward()
        out[shared] = sums.detach().cpu(), hs[0].grad.cpu()
    assert launches == [True, False]
    ref_h = [h.clone().requires_grad_(m == 0) for m, h in enumerate(hiddens)]
    ref = _oracle(ref_h, weights, targets, segs, S, softcaps)
    ref[0].sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for shared in (True, False):
        assert_close(out[shared][0], ref.detach(), tol, f"sums (shared head: {shared})")
        assert_close(out[shared][1], ref_h[0].grad, tol, f"d_hidden (shared head: {shared})")
    assert frozen.grad is None
