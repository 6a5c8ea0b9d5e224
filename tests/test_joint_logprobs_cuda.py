"""CUDA-only checks of the joint Triton kernel: bf16 at HDPO sizes. Skipped without a GPU."""

import pytest
import torch

from polyfast.kernels import joint_logprobs
from tests.utils import rel_err

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_three_models_against_fp64_reference():
    N, V, S = 4096, 151936, 16
    sizes = (1536, 1536, 896)  # policy, reference, a smaller critic
    g = torch.Generator(device="cuda").manual_seed(0)
    hs = [torch.randn(N, H, device="cuda", generator=g).to(torch.bfloat16) for H in sizes]
    ws = [(torch.randn(V, H, device="cuda", generator=g) / H ** 0.5 * 4).to(torch.bfloat16)
          for H in sizes]
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    L = N // S
    seg = torch.arange(S, device="cuda").repeat_interleave(L)
    seg = torch.where(torch.arange(N, device="cuda") % L < L // 4, -1, seg)
    results = {}
    for name, dtype, backend in (("triton", torch.bfloat16, "triton"),
                                 ("ref64", torch.float64, "reference"),
                                 ("torch_bf16", torch.bfloat16, "reference")):
        h = [x.to(dtype).clone().requires_grad_(m == 0) for m, x in enumerate(hs)]
        w = [x.to(dtype).clone().requires_grad_(m == 0) for m, x in enumerate(ws)]
        if name == "torch_bf16":  # the baseline: logits in bf16, log-softmax in fp32
            lp = [torch.log_softmax((a @ b.T).float(), -1).gather(1, targets[:, None])[:, 0]
                  for a, b in zip(h, w)]
            sums = torch.stack([x.new_zeros(S).index_add(0, seg.clamp(min=0), x * (seg >= 0)) for x in lp])
        else:
            sums, _ = joint_logprobs(h, w, targets, seg, S, backend=backend)
        sums.double().sum().backward()
        results[name] = (sums.detach(), h[0].grad, w[0].grad)
    for i, what in enumerate(("sums", "d_hidden", "d_weight")):
        ea = rel_err(results["triton"][i], results["ref64"][i])
        eb = rel_err(results["torch_bf16"][i], results["ref64"][i])
        print(f"{what}: triton {ea:.2e}, torch bf16 {eb:.2e}")
        assert ea <= 2 * eb + 1e-6, (what, ea, eb)
