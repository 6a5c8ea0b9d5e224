"""HDPO: packed pair log-probs equal unpacked ones; a short run learns the preference."""

import pytest
import torch
from polyfast.kernels import joint_logprobs

from polyfast.config import HDPOConfig, ModelConfig, SFTConfig, TinyModelConfig, load_config
from polyfast.data import byte_tokenizer, demo_records, make_pairs
from polyfast.data.groups import collate_groups, encode_groups, pack_groups
from polyfast.model import head_weight, hidden_states, load_model, set_packed
from polyfast.train.hdpo import HDPOTrainer
from polyfast.train.sft import SFTTrainer
from tests.utils import assert_close


def hdpo_pairs(n=24, stride=13):
    # rejected: the human response with its words in reverse order, a systematic difference
    recs = [r for r in demo_records("train") if r.length_bin != "xlong"][::stride][:n]
    reverse = lambda t: " ".join(t.split()[::-1]) if " " in t else t[::-1]  # noqa: E731
    pairs, _ = make_pairs(recs, {r.id: reverse(r.response) for r in recs})
    return pairs


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_pair_logprobs_equal_unpacked_sums(arch, shared):
    tok = byte_tokenizer()
    model = load_model(ModelConfig(tiny=TinyModelConfig(arch=arch, hidden_size=48, num_layers=2,
                                                        num_heads=4, num_kv_heads=2,
                                                        intermediate_size=96)), tok).eval()
    examples, _ = encode_groups(tok, hdpo_pairs(8), system="profile", max_tokens=4096, shared=shared)
    names = sorted({e.bucket for e in examples})
    (pack,) = pack_groups(examples, 100_000, packing="mixed")
    assert len(pack) == 8
    with torch.no_grad():
        batch, sc = collate_groups(pack, names)
        h = hidden_states(model, batch).index_select(0, sc.rows)
        sums, counts = joint_logprobs([h], [head_weight(model)], sc.targets, sc.segments,
                                      sc.num_segments)
        set_packed(model, False)
        for k, g in enumerate(pack):
            for side, response in enumerate(g.responses):
                ids = torch.tensor([g.prompt + response])
                logits = (model.model(input_ids=ids).last_hidden_state[0].double()
                          @ head_weight(model).double().T)
                lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
                expected = lp[len(g.prompt) - 1:].sum()
                assert counts[2 * k + side] == len(response)
                assert sums[0, 2 * k + side].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-4)
    assert sc.chosen.tolist() == list(range(0, 16, 2))
    assert sc.rejected.tolist() == list(range(1, 16, 2))


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("sft")
    cfg = load_config(SFTConfig, None, [], extra={
        "run_dir": str(run), "model.tiny.hidden_size": 64, "model.tiny.num_layers": 2,
        "model.tiny.intermediate_size": 128, "train.max_steps": 40, "train.lr": 3e-3,
        "train.progress": False, "data.max_tokens": 2048, "data.val": None})
    return SFTTrainer(cfg).fit()["summary"]["export"]


@pytest.mark.parametrize("distance,reference", [("feature", "live"), ("lm", "precomputed")])
def test_short_hdpo_run_learns_the_preference(sft_checkpoint, tmp_path, distance, reference):
    pairs = hdpo_pairs(40, 7)
    cfg = load_config(HDPOConfig, None, [], extra={
        "model.path": sft_checkpoint, "run_dir": str(tmp_path / "hdpo"), "hdpo.distance": distance,
        "hdpo.reference": reference, "hdpo.min_bucket_size": 3, "train.lr": 2e-4,
        "train.max_steps": 24, "train.progress": False, "data.max_tokens": 4096})
    tr = HDPOTrainer(cfg, pairs=pairs[:32], val_pairs=pairs[32:])
    result = tr.fit()
    before, after = result["eval_before"], result["eval_after"]
    assert before["accuracy"] == 0.0  # policy == reference: every reward is 0
    assert after["accuracy"] > 0.5 and after["margin"] > 0, after
    # no collapse: the chosen side's mean log-prob per token falls by less than 0.25 nats
    assert -after["anchor"] > -before["anchor"] - 0.25, (before["anchor"], after["anchor"])


def test_hdpo_loss_does_not_depend_on_micro_batching(sft_checkpoint, tmp_path):
    pairs = hdpo_pairs(12, 11)
    losses = []
    for ga, cap in ((1, 100_000), (3, 3000)):
        cfg = load_config(HDPOConfig, None, [], extra={
            "model.path": sft_checkpoint, "run_dir": str(tmp_path / f"h{ga}"), "hdpo.distance": "feature",
            "hdpo.min_bucket_size": 3, "data.max_tokens": cap, "train.grad_accum": ga, "train.progress": False})
        tr = HDPOTrainer(cfg, pairs=pairs)
        tr.model.double()  # float64 end to end: any difference is summation order, not the loss
        tr.reference.double()
        packs = pack_groups(tr.examples, cap, packing="mixed")
        out = tr.forward_backward(packs)
        grads = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
        losses.append((out["loss"].item(), grads, len(packs)))
    assert losses[0][2] == 1 and losses[1][2] > 1
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-10)
    assert (losses[0][1] - losses[1][1]).abs().max() <= 1e-9 * losses[0][1].abs().max()


def test_a_critic_that_is_the_reference_is_held_once_and_gives_the_same_loss(sft_checkpoint,
                                                                               tmp_path):
    import random
    import shutil
    import string
    copy = str(shutil.copytree(sft_checkpoint, tmp_path / "copy"))  # the same weights, elsewhere
    rng = random.Random(0)
    recs = [r for r in demo_records("train") if r.length_bin != "xlong"][::11][:12]
    # rejected: punctuation noise, far outside the human side's NLL band
    pairs, _ = make_pairs(recs, {r.id: "".join(rng.choice(string.punctuation) for _ in range(80))
                                 for r in recs})
    losses, regs = [], []
    for critic in (None, copy):
        cfg = load_config(HDPOConfig, None, [], extra={
            "model.path": sft_checkpoint, "run_dir": str(tmp_path / f"h{critic is None}"),
            "hdpo.distance": "lm", "hdpo.critic_model": critic, "hdpo.min_bucket_size": 3,
            "train.lr": 1e-3, "train.max_steps": 4, "train.progress": False,
            "data.max_tokens": 3000})
        tr = HDPOTrainer(cfg, pairs=pairs)
        assert (tr.critic is tr.reference) == (critic is None)
        tr.train_step(tr.step_packs(0))  # now the policy differs from the reference and critic
        out = tr.forward_backward(tr.step_packs(1))
        losses.append(out["loss"].item())
        regs.append(out["dist_reg"])
    assert regs[0].abs().sum() > 0  # the critic's distances take part in the loss
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert torch.allclose(regs[0], regs[1], rtol=1e-6, atol=1e-8)


def test_model_dtype_auto_on_cuda_runs_the_joint_pass_in_bf16(sft_checkpoint, tmp_path,
                                                              monkeypatch):
    # as tests/test_sft.py checks for SFT: the policy's and the frozen reference's heads get the
    # autocast dtype the trainer picks for CUDA, though their hidden states and weights are fp32
    from tests.utils import step_under_cuda_autocast
    cfg = load_config(HDPOConfig, None, [], extra={
        "model.path": sft_checkpoint, "run_dir": str(tmp_path / "h"), "hdpo.distance": "feature",
        "hdpo.min_bucket_size": 3, "hdpo.loss_backend": "torch", "train.progress": False})
    tr = HDPOTrainer(cfg, pairs=hdpo_pairs(12, 11))
    out, seen = step_under_cuda_autocast(tr, monkeypatch)
    assert len(seen) >= 2 and set(seen) == {(torch.bfloat16, torch.bfloat16)}  # policy + reference
    assert torch.isfinite(out["loss"])
    assert torch.is_autocast_enabled("cpu") is False  # the contexts closed behind the step
    grads = [p.grad for p in tr.model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_pairs_that_teach_no_preference_are_dropped_and_counted(sft_checkpoint, tmp_path, caplog):
    import dataclasses
    import logging

    from polyfast.errors import ConfigError
    good = hdpo_pairs(6)
    equal = dataclasses.replace(good[0], rejected=good[0].chosen + "  ")  # equal once stripped
    empty = dataclasses.replace(good[1], rejected=" \n")
    cfg = load_config(HDPOConfig, None, [], extra={
        "model.path": sft_checkpoint, "run_dir": str(tmp_path / "hdpo"), "hdpo.distance": "none",
        "train.max_steps": 1, "train.progress": False, "data.max_tokens": 4096})
    with caplog.at_level(logging.WARNING, logger="polyfast"):
        tr = HDPOTrainer(cfg, pairs=[equal, *good[2:], empty], val_pairs=[equal, good[1]])
    assert [p.id for p in tr.pairs] == [p.id for p in good[2:]]
    assert [p.id for p in tr.val_pairs] == [good[1].id]
    assert tr.counts["dropped_equal"] == 1 and tr.counts["dropped_empty_rejected"] == 1
    assert tr.start_row()["counts"]["dropped_equal"] == 1  # in metrics.jsonl's data row
    assert "train pairs dropped: dropped_empty_rejected 1, dropped_equal 1" in caplog.text
    with pytest.raises(ConfigError, match="no usable pair .*dropped_equal 1"):
        HDPOTrainer(cfg, pairs=[equal])


@pytest.mark.parametrize("distance,reference", [("feature", "live"), ("lm", "precomputed")])
def test_prefix_sharing_changes_the_layout_not_the_loss(sft_checkpoint, tmp_path, distance,
                                                        reference):
    import dataclasses
    base = hdpo_pairs(6, 17)
    # more rejected responses for three prompts: groups of four and three responses
    pairs = (base + [dataclasses.replace(p, rejected=p.rejected.upper()) for p in base[:3]]
             + [dataclasses.replace(p, rejected=p.rejected[:7] + "?") for p in base[:2]])
    runs = {}
    for shared in (True, False):
        cfg = load_config(HDPOConfig, None, [], extra={
            "model.path": sft_checkpoint, "run_dir": str(tmp_path / f"h{shared}"),
            "hdpo.distance": distance, "hdpo.reference": reference, "hdpo.min_bucket_size": 3,
            "hdpo.prefix_sharing": shared, "data.max_tokens": 100_000, "train.progress": False})
        tr = HDPOTrainer(cfg, pairs=pairs)
        assert tr.counts["kept"] == 11 and tr.counts["groups"] == 6
        packs = pack_groups(tr.examples, 100_000, packing="mixed")
        out = tr.forward_backward(packs)
        grads = torch.cat([p.grad.flatten() for p in tr.model.parameters() if p.grad is not None])
        order = torch.tensor([i for p in packs for g in p for i, _, _ in g.pairs]).argsort()
        per_pair = {k: v[order] for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim()}
        runs[shared] = ({**per_pair, "loss": out["loss"]}, grads,
                        sum(g.computed_tokens for p in packs for g in p),
                        [[g.pairs for g in p] for p in pack_groups(tr.examples, 3000, seed=5)])
    (sh, g_sh, t_sh, packs_sh), (un, g_un, t_un, packs_un) = runs[True], runs[False]
    assert packs_sh == packs_un and len(packs_sh) > 1  # the packs do not depend on the layout
    assert t_sh < t_un  # the prompts laid out once
    # float32: a shared prompt row sums its responses' gradients before rounding, the copies
    # after (HF's RMSNorm rounds to float32 even in a float64 model: float64 is no tighter)
    tol = 1e-5
    assert sh["loss"].item() == pytest.approx(un["loss"].item(), rel=tol)
    for k in ("rewards_chosen", "rewards_rejected", "dist_reg", "anchor"):
        assert_close(sh[k], un[k], tol, k)
    assert_close(g_sh, g_un, tol, "policy gradients")


def test_a_planted_reference_cache_never_runs_and_is_computed_again(sft_checkpoint, tmp_path,
                                                                    caplog):
    import glob
    import logging
    import os
    import pickle
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    cfg = load_config(HDPOConfig, None, [], extra={
        "model.path": sft_checkpoint, "run_dir": str(tmp_path / "h"), "hdpo.distance": "feature",
        "hdpo.reference": "precomputed", "hdpo.min_bucket_size": 3, "train.progress": False,
        "data.max_tokens": 4096})
    pairs = hdpo_pairs(6, 7)
    want = HDPOTrainer(cfg, pairs=pairs).tables["train"].values
    (cache,) = glob.glob(str(tmp_path / "h" / "ref_logps_*.safetensors"))
    with open(cache, "wb") as f:
        pickle.dump(Payload(), f)
    with caplog.at_level(logging.WARNING, logger="polyfast"):
        got = HDPOTrainer(cfg, pairs=pairs).tables["train"].values
    assert not marker.exists(), "a payload ran"
    assert cache in caplog.text and "computing it again" in caplog.text
    assert torch.equal(got, want)
