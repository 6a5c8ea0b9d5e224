"""CUDA-only checks of the GPU model path: Liger modules and compiled decoder layers compute the
same step, a training step (SFT and HDPO) makes no host sync, a train row reaches the host without
one, and a NaN step is skipped on the device without one. Skipped without a GPU."""

import pytest
import torch

from tests.test_hdpo import hdpo_pairs
from tests.test_sft import param_grads, sft_trainer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("option", ["model.liger", "model.compile"])
def test_liger_modules_and_compiled_layers_give_the_same_step(tmp_path, option):
    if option == "model.liger":
        pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    plain = sft_trainer(tmp_path / "p", **{"train.device": "cuda", option: False})
    fast = sft_trainer(tmp_path / "f", **{"train.device": "cuda", option: True})
    pack = plain.step_packs(0)[0]
    losses, grads = [], []
    for tr in (plain, fast):
        losses.append(tr.forward_backward([pack])["loss"].item())
        grads.append(param_grads(tr).double())
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)  # both under bf16 autocast
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.999, cos


def _no_sync_steps(tr, steps=2):
    tr.train_step(tr.step_packs(0))  # the first step creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(1, 1 + steps):
            tr.train_step(tr.step_packs(s))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sft_and_hdpo_steps_make_no_host_sync(tmp_path):
    sft = sft_trainer(tmp_path / "sft", **{"train.device": "cuda", "train.max_steps": 3,
                                        "train.grad_accum": 2, "train.loss_backend": "triton"})
    _no_sync_steps(sft)
    export = sft.export(str(tmp_path / "sft" / "final"))

    from polyfast.config import HDPOConfig, load_config
    from polyfast.train.hdpo import HDPOTrainer
    for reference in ("live", "precomputed"):
        cfg = load_config(HDPOConfig, None, [], extra={
            "model.path": export, "run_dir": str(tmp_path / f"hdpo_{reference}"),
            "hdpo.distance": "feature", "hdpo.min_bucket_size": 3, "hdpo.reference": reference,
            "hdpo.loss_backend": "triton", "train.device": "cuda", "train.progress": False,
            "train.grad_accum": 2, "data.max_tokens": 2048})
        _no_sync_steps(HDPOTrainer(cfg, pairs=hdpo_pairs(40, 7)))


def test_a_nan_step_is_skipped_on_the_device_and_reported_after_the_fact():
    from polyfast.train.guard import NonFiniteGuard
    p = torch.nn.Parameter(torch.ones(1000, device="cuda"))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    guard = NonFiniteGuard(opt, p.device, deferred=True)
    assert guard.deferred and guard.cuda
    found, before = [], None
    torch.cuda.set_sync_debug_mode("error")  # the guarded steps themselves never wait
    try:
        for step in range(1, 7):
            if step == 4:
                before = p.detach().clone()
            p.grad = torch.full_like(p, float("nan") if step == 4 else 1.0)
            found += guard.step(step, p.grad.sum(), p.grad.norm())
            if step == 4:
                after = p.detach().clone()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    found += guard.poll(wait=True)
    assert [b.step for b in found] == [4] and found[0].loss != found[0].loss  # NaN
    assert torch.equal(before, after)  # step 4 changed nothing
    assert int(opt.state[p]["step"]) == 5 and torch.isfinite(p).all()


def test_a_train_row_travels_to_the_host_without_a_sync():
    """What lets fit() log every step without stalling the device: the row's tensors are copied
    behind the step's work into pinned memory, and only their own event is waited on."""
    from polyfast.train.base import _to_host
    out = {"loss": torch.randn((), device="cuda"), "bucket_sum": torch.randn(5, device="cuda"),
           "buckets": ["a", "b"]}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        host, landed = _to_host(out, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    landed.synchronize()
    assert host["loss"].device.type == "cpu" and host["loss"].is_pinned()
    assert torch.equal(host["bucket_sum"], out["bucket_sum"].cpu()) and host["buckets"] == ["a", "b"]
