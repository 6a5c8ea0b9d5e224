"""Bucket-Aware SFT: the step loss is docs/method.md section 2 whatever the micro-batching; resume is exact;
the export loads in transformers."""

import json
import os

import pytest
import torch
from polyfast.kernels import linear_ce_reference

from polyfast.config import SFTConfig, load_config
from polyfast.data import bucket_weights, byte_tokenizer, demo_records, encode_records
from polyfast.data.tokenize import fit_length
from polyfast.errors import Interrupted
from polyfast.model import head_weight, set_packed
from polyfast.train.sft import PreparedData, SFTTrainer

TINY = {"model.tiny.hidden_size": 48, "model.tiny.num_layers": 2, "model.tiny.num_heads": 4,
        "model.tiny.num_kv_heads": 2, "model.tiny.intermediate_size": 96,
        "train.progress": False, "train.lr": 1e-3}


def sft_data(tok, n=30, max_tokens=1024):
    by_bucket = {}
    for r in demo_records("train"):
        if r.length_bin in ("short", "medium"):
            by_bucket.setdefault(r.bucket_id, []).append(r)
    # 1, 2 or 3 records from every short/medium bucket of both languages: unequal weights
    recs = [r for i, b in enumerate(sorted(by_bucket)) for r in by_bucket[b][:1 + i % 3]][:n]
    weights = bucket_weights(recs)
    assert len(set(weights.values())) > 1  # the weights differ, so weighting matters
    exs = [fit_length(e, max_tokens) for e in encode_records(tok, recs, weights=weights)]
    val = [e for e in (fit_length(v, max_tokens) for v in
                       encode_records(tok, demo_records("val")[::15], weights=weights)) if e]
    names = sorted({e.bucket for e in exs} | {e.bucket for e in val})
    return PreparedData(exs, val, weights, names)


def sft_trainer(tmp_path, packing="bucket", weighting="bucket", **over):
    tok = byte_tokenizer()
    extra = {**TINY, "run_dir": str(tmp_path / "run"), "data.packing": packing,
             "data.weighting": weighting, "data.max_tokens": 1024, **over}
    cfg = load_config(SFTConfig, None, [], extra=extra)
    return SFTTrainer(cfg, data=sft_data(tok), tokenizer=tok)


def _method_loss(trainer, examples):
    """docs/method.md section 2 directly: per-example forward (no packing), full logits in float64."""
    model = trainer.model
    set_packed(model, False)
    W = head_weight(model)
    num = den = 0.0
    for ex in examples:
        h = model.model(input_ids=torch.tensor([ex.input_ids])).last_hidden_state[0]
        targets = torch.tensor(ex.input_ids[1:] + (-100,))
        targets[: ex.n_prompt - 1] = -100
        ce = linear_ce_reference(h.double(), W.double(), targets, reduction="none")
        L_i = ce.sum() / ex.n_response
        num, den = num + ex.weight * L_i, den + ex.weight
    set_packed(model, trainer.packed)
    return num / den


def param_grads(trainer):
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


@pytest.mark.parametrize("packing", ["bucket", "mixed", "none"])
def test_step_loss_is_the_method_formula_for_any_micro_batching(tmp_path, packing):
    tr = sft_trainer(tmp_path, packing)
    exs = tr.data.train
    expected = _method_loss(tr, exs)
    results = []
    for mb in (1, 4):
        if mb == 1:
            packs = [[e] for e in exs]
        elif packing == "none":
            packs = [exs[i:i + 4] for i in range(0, len(exs), 4)]
        else:
            from polyfast.data import pack_examples
            packs = pack_examples(exs, 4 * max(map(len, exs)), packing)
            assert max(map(len, packs)) >= 3
        tr.model.zero_grad(set_to_none=True)
        out = tr.forward_backward(packs)
        results.append((out["loss"].item(), param_grads(tr)))
    for loss, _ in results:
        assert loss == pytest.approx(expected.item(), rel=1e-5)
    g1, g4 = results[0][1], results[1][1]
    assert (g1 - g4).abs().max() <= 1e-5 * g1.abs().max()


def test_bucket_weights_change_the_loss(tmp_path):
    a = sft_trainer(tmp_path, weighting="bucket")
    b = sft_trainer(tmp_path, weighting="example")
    packs = [[e] for e in a.data.train]
    la, lb = a.forward_backward(packs)["loss"].item(), b.forward_backward(packs)["loss"].item()
    assert abs(la - lb) > 1e-4  # same model init (seeded), different weighting


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r.get("event") == "train"}


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    over = {"train.max_steps": 6, "train.log_every": 1, "train.save_every": 3, "train.warmup_ratio": 0.3}
    full = sft_trainer(tmp_path / "a", **over)
    full.fit()
    expected = _losses(full.cfg.run_dir)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    first = sft_trainer(tmp_path / "b", **over)
    real_step = first.train_step

    def crash_after_three(packs):
        if first.step == 4:
            raise KeyboardInterrupt  # the run dies during step 5
        return real_step(packs)
    first.train_step = crash_after_three
    with pytest.raises(Interrupted, match=r"interrupted at step 4 of 6; the last checkpoint is "
                                          r".*step_000003"):  # Ctrl-C: where, and what resumes
        first.fit()
    ckpts = os.listdir(os.path.join(first.cfg.run_dir, "checkpoints"))
    assert ckpts == ["step_000003"]  # written atomically: no temporary left behind

    resumed = sft_trainer(tmp_path / "b", **over, **{"train.resume": True})
    assert resumed.resume() and resumed.step == 3
    from transformers import (
        AutoModelForCausalLM,  # the checkpoint's hf/ holds the same model
    )
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(first.cfg.run_dir, "checkpoints",
                                                           "step_000003", "hf"))
    for (name, p), q in zip(resumed.model.state_dict().items(), hf.state_dict().values()):
        assert torch.equal(p, q), name
    result = resumed.fit()
    # the closing table compares with the run's own evaluation before step 1, kept in the log
    assert result["eval_before"] and result["eval_before"]["buckets"]
    assert result["summary"]["steps_run"] == 3 and result["summary"]["resumed_from_step"] == 3
    got = _losses(resumed.cfg.run_dir)
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_fit_exports_a_model_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tr = sft_trainer(tmp_path, **{"train.max_steps": 6, "train.lr": 3e-3})
    result = tr.fit()
    export = result["summary"]["export"]
    assert os.path.exists(os.path.join(tmp_path, "run", "config.yaml"))
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor([tok("Tea?", add_special_tokens=False)["input_ids"]])
    set_packed(tr.model, False)
    with torch.no_grad():
        assert (model(ids).logits - tr.model(ids).logits).abs().max() <= 1e-5
    before, after = result["eval_before"]["buckets"], result["eval_after"]["buckets"]
    assert set(after) == {e.bucket for e in tr.data.val}
    rose = {b: (before[b], after[b]) for b in after if after[b] >= before[b]}
    assert not rose, f"eval loss rose in {rose}"


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    plain = sft_trainer(tmp_path / "p")
    ckpt = sft_trainer(tmp_path / "c", **{"model.activation_checkpointing": True})
    ga, gb = [], []
    for tr, out in ((plain, ga), (ckpt, gb)):
        tr.model.zero_grad(set_to_none=True)
        tr.forward_backward([tr.data.train[:3]])
        out.append(param_grads(tr))
    assert (ga[0] - gb[0]).abs().max() <= 1e-6 * ga[0].abs().max()


def test_model_dtype_auto_on_cuda_runs_the_loss_head_in_bf16(tmp_path, monkeypatch):
    # model.dtype auto on CUDA: fp32 weights under bf16 autocast. HF models hand the loss fp32
    # hidden states even then (residual stream and final norm stay fp32), so the loss op must take
    # its compute dtype from autocast. The step runs here on the CPU, under the autocast dtype the
    # trainer picks for CUDA, and records what reaches the head's matmuls.
    from polyfast.config import ModelConfig
    from polyfast.model import autocast_dtype
    from tests.utils import step_under_cuda_autocast
    assert autocast_dtype(ModelConfig(), torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype(ModelConfig(), torch.device("cpu")) is None
    assert autocast_dtype(ModelConfig(dtype="float32"), torch.device("cuda")) is None
    tr = sft_trainer(tmp_path, **{"train.loss_backend": "torch"})
    out, seen = step_under_cuda_autocast(tr, monkeypatch)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert torch.isfinite(out["loss"])
    params = [p for p in tr.model.parameters() if p.grad is not None]
    assert params and all(p.dtype == p.grad.dtype == torch.float32 for p in params)
    assert all(torch.isfinite(p.grad).all() for p in params)
