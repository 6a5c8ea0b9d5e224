"""CUDA-only: prefix sharing on the varlen kernels (flash-attn or torch's varlen attention, causal
masks aligned bottom-right) gives the unshared layout's log-probs and gradients in bf16, to the
unshared run's own error against an fp32 run. Skipped without a GPU."""

import dataclasses

import pytest
import torch

from polyfast import attention
from polyfast.data import byte_tokenizer
from tests.test_prefix_sharing import loss_and_grads, make_groups, tiny_model
from tests.utils import rel_err

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefix_on_the_varlen_kernels_in_bf16(arch, monkeypatch):
    calls = []
    real = attention.cuda_varlen
    monkeypatch.setattr(attention, "cuda_varlen",
                        lambda *a, **k: calls.append(not torch.equal(a[3], a[4])) or real(*a, **k))
    model = tiny_model(arch, byte_tokenizer()).cuda()

    def run(shared, dtype):
        pack = [dataclasses.replace(g, shared=shared) for g in make_groups()]
        torch.manual_seed(0)  # the same random distances in every run
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            sums, _, grads, _ = loss_and_grads(model, pack)
        return sums, grads

    ref = run(False, torch.float32)  # fp32: the per-example loop (the kernels take 16-bit only)
    assert not calls
    shared, unshared = run(True, torch.bfloat16), run(False, torch.bfloat16)
    assert any(calls), "the shared layout did not reach the varlen kernels"
    for i, what in enumerate(("log-prob sums", "gradients")):
        e_shared, e_unshared = rel_err(shared[i], ref[i]), rel_err(unshared[i], ref[i])
        print(f"{arch} {what}: shared {e_shared:.2e}, unshared {e_unshared:.2e} against fp32")
        assert e_shared <= 2 * e_unshared + 1e-3, (what, e_shared, e_unshared)
