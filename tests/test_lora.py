"""LoRA through peft: the packed, fused path gives the loss and adapter gradients of plain peft +
transformers on unpacked examples (fp64); the frozen head gets no gradient work; HDPO's reference
is the base model (adapters off); exports load with plain peft; resume is exact; bad settings are
errors naming the key."""

import json
import os

import pytest
import torch
from test_sft import sft_data

from polyfast.config import HDPOConfig, SFTConfig, load_config, show_config
from polyfast.data import byte_tokenizer
from polyfast.errors import ConfigError
from polyfast.kernels import torch_twin
from polyfast.losses import step_normalizer
from polyfast.model import load_pretrained
from polyfast.train import checkpoint as ckpt_mod
from polyfast.train.sft import SFTTrainer
from tests.utils import killed_at

TINY = {"model.tiny.hidden_size": 32, "model.tiny.num_layers": 2, "model.tiny.num_heads": 4,
        "model.tiny.num_kv_heads": 2, "model.tiny.intermediate_size": 64, "train.progress": False,
        "train.lr": 1e-2, "data.max_tokens": 1024, "train.checkpoint_hf": False}
LORA = {"model.lora.r": 4, "model.lora.alpha": 8.0}


def _trainer(run_dir, **over):
    tok = byte_tokenizer()
    cfg = load_config(SFTConfig, None, [], extra={**TINY, **LORA, "run_dir": str(run_dir), **over})
    return SFTTrainer(cfg, data=sft_data(tok), tokenizer=tok)


def _randomise_adapters(model, seed=1):
    """B = 0 at init makes the adapters a no-op (and A's gradient 0): give them values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def _adapters(model):
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


# -- config -------------------------------------------------------------------------------------


def test_lora_config_errors_name_the_key_and_the_modules_there_are(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["model.lora.r=0"])
    assert e.value.key == "model.lora.r"
    with pytest.raises(ConfigError) as e:
        _trainer(tmp_path / "run", **{"model.lora.target_modules": ["q_proj", "qkv"]})
    assert e.value.key == "model.lora.target_modules"
    assert "qkv not among the model's linear layers" in str(e.value)
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)  # what it has
    with pytest.raises(ConfigError) as e:
        _trainer(tmp_path / "run", **{"model.lora.target_modules": ["lm_head"]})
    assert "loss head" in str(e.value)
    shown = show_config(SFTConfig, load_config(SFTConfig, None, ["model.lora.r=8"]))
    assert "  lora:" in shown and "    r: 8" in shown and "target_modules" in shown
    assert "lora: null" in show_config(SFTConfig)  # full fine-tuning by default


# -- the fast path against plain peft + transformers ----------------------------------------------


def test_packed_fused_lora_matches_unpacked_peft_loss_and_adapter_grads(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tr = _trainer(tmp_path / "run")
    model = tr.model.double()
    _randomise_adapters(model)
    assert not tr.model.get_output_embeddings().weight.requires_grad  # the head is frozen
    pack = max(tr.packs(0), key=len)
    assert len(pack) >= 2  # attention must not cross examples
    batch = tr.batch(pack)
    normalizer = step_normalizer(pack, tr.cfg.data.weighting)
    loss, _ = tr.micro_loss(batch, normalizer)
    loss.backward()

    # the same model as plain peft on plain transformers, one example at a time: with eager
    # attention (the reference) and with SDPA (the baseline: what transformers' own fp64 paths
    # differ by; its RoPE tables are fp32)
    ours = _adapters(model)

    def plain_peft(attn):
        from polyfast.lora import plain_state_dict
        ref = AutoModelForCausalLM.from_config(model.config, attn_implementation=attn,
                                               dtype=torch.float64)
        ref.load_state_dict(plain_state_dict(model, merge=False), strict=False)
        ref.tie_weights()
        ref = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8.0, target_modules=list(
            tr.cfg.model.lora.target_modules), task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if ".lora_" in name:
                    p.copy_(ours[name.removeprefix("base_model.model.")])
        ce = []
        for ex in pack:
            ids = torch.tensor([ex.input_ids])
            logits = ref(input_ids=ids).logits[0].double()  # (L, V)
            ce.append(torch.nn.functional.cross_entropy(
                logits[ex.n_prompt - 1:-1], ids[0, ex.n_prompt:], reduction="none"))
        total = (torch.cat(ce) * batch.scored.weights.double()).sum() / normalizer
        total.backward()
        return total.item(), {n.removeprefix("base_model.model."): p.grad
                              for n, p in ref.named_parameters() if ".lora_" in n}

    want, theirs = plain_peft("eager")
    base_loss, baseline = plain_peft("sdpa")
    assert set(theirs) == set(ours) and len(ours) == 2 * 7 * 2  # A, B x 7 layers x 2 blocks
    assert abs(loss.item() - want) <= 2 * abs(base_loss - want) + 1e-12 * abs(want)

    def err(a, b):
        return ((a - b).norm() / b.norm()).item()
    for name, p in ours.items():
        e, e0 = err(p.grad, theirs[name]), err(baseline[name], theirs[name])
        assert e <= 2 * e0 + 1e-12, f"{name}: gradient error {e:.2e}, SDPA's {e0:.2e}"
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_a_frozen_head_gets_no_gradient_work(tmp_path, monkeypatch):
    tr = _trainer(tmp_path / "run")
    seen = []
    real = torch_twin.ChunkedLinearCE.backward

    def spy(ctx, grad_out):
        seen.append(ctx.needs_input_grad[:2])
        return real(ctx, grad_out)
    monkeypatch.setattr(torch_twin.ChunkedLinearCE, "backward", staticmethod(spy))
    tr.train_step(tr.step_packs(0))
    assert seen and all(need == (True, False) for need in seen)  # d_hidden only, no (V, H) d_weight


# -- HDPO: the reference is the base with the adapters off ----------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """An exported tiny model (full fine-tuning, a few steps) and pairs from the demo data."""
    root = tmp_path_factory.mktemp("lora_base")
    tr = _trainer(root / "sft", **{"model.lora": None, "train.max_steps": 2})
    tr.fit()
    return str(root / "sft" / "final")


def _hdpo(tmp_path, model_path, **over):
    from test_hdpo import hdpo_pairs

    from polyfast.train.hdpo import HDPOTrainer
    extra = {**{k: v for k, v in TINY.items() if k.startswith(("train.", "data."))},
             "model.path": model_path, "run_dir": str(tmp_path / "hdpo"), "hdpo.distance": "none",
             "data.max_tokens": 2048, **LORA, **over}
    cfg = load_config(HDPOConfig, None, [], extra=extra)
    return HDPOTrainer(cfg, pairs=hdpo_pairs(12, 13))


def test_hdpo_reference_is_the_base_model_with_adapters_off(tmp_path, base_dir):
    from polyfast.train.hdpo import AdaptersOff

    tr = _hdpo(tmp_path, base_dir)
    assert isinstance(tr.reference, AdaptersOff) and tr.reference.policy is tr.model
    _randomise_adapters(tr.model)
    base = load_pretrained(base_dir, "test", attn_implementation=tr.model.config._attn_implementation)
    base.eval().requires_grad_(False)
    pack = tr.packs(0)[0]
    with torch.no_grad():
        ref, _, _ = tr._logps(pack, [tr.reference], [False])
        want, _, _ = tr._logps(pack, [base], [False])
        policy, _, _ = tr._logps(pack, [tr.model], [False])
        joint, _, _ = tr._logps(pack, [tr.model, tr.reference], [False, False])
    torch.testing.assert_close(ref, want, rtol=1e-6, atol=1e-5)
    assert (policy - want).abs().max() > 1e-2  # the adapters do change the policy
    torch.testing.assert_close(joint, torch.cat([policy, ref]), rtol=1e-6, atol=1e-5)
    # the trainer holds one copy of the weights: no reference model beside the policy (as full
    # fine-tuning holds one)
    assert _held_weights(tr) == {p.data_ptr() for p in tr.model.parameters()}
    full = _hdpo(tmp_path / "full", base_dir, **{"model.lora": None})
    assert _held_weights(full) > {p.data_ptr() for p in full.model.parameters()}


def _held_weights(trainer) -> set[int]:
    """The storage of every parameter of every model a trainer holds."""
    models = [v for v in vars(trainer).values() if isinstance(v, torch.nn.Module)]
    return {p.data_ptr() for m in models for p in m.parameters()}


def test_lora_sft_then_lora_hdpo_exports_load_with_plain_peft(tmp_path, base_dir):
    from peft import PeftModel

    tr = _hdpo(tmp_path, base_dir, **{"train.max_steps": 2, "model.lora.export": "both"})
    _randomise_adapters(tr.model)
    out = tr.fit()["summary"]["export"]
    assert sorted(os.listdir(out)) >= ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(base_dir)
    ids = torch.tensor([[5, 40, 41, 42, 43, 44]])
    plain = PeftModel.from_pretrained(load_pretrained(base_dir, "base"), out).eval()
    ours = load_pretrained(out, "ours").eval()  # polyfast merges the adapter into its base
    merged = load_pretrained(os.path.join(out, "merged"), "merged").eval()
    with torch.no_grad():
        want = plain(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        assert (want - load_pretrained(base_dir, "base")(input_ids=ids).logits).abs().max() > 1e-3


def test_a_tiny_lora_export_carries_its_base_and_an_adapter_chain_loads(tmp_path):
    tr = _trainer(tmp_path / "sft", **{"train.max_steps": 1})
    _randomise_adapters(tr.model)
    out = tr.fit()["summary"]["export"]
    assert os.path.isfile(os.path.join(out, "base", "model.safetensors"))  # no model.path: saved
    ids = torch.tensor([[5, 40, 41, 42]])
    with torch.no_grad():
        tr.model.eval()
        want = tr.model(input_ids=ids).logits
        got = load_pretrained(out, "x", attn_implementation=tr.model.config._attn_implementation)
        torch.testing.assert_close(got.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    os.rename(os.path.join(out, "adapter_model.safetensors"), os.path.join(out, "adapter_model.bin"))
    with pytest.raises(ConfigError, match="pickled adapter_model.bin"):
        load_pretrained(out, "--model")


def test_lora_resume_gives_the_uninterrupted_losses(tmp_path):
    over = {"train.max_steps": 6, "train.save_every": 2, "train.log_every": 1}
    straight = _trainer(tmp_path / "straight", **over)
    straight.fit()
    killed = _trainer(tmp_path / "killed", **over)
    killed_at(killed, 3)
    ckpt = ckpt_mod.list_checkpoints(killed.cfg.run_dir)[-1]
    from polyfast.train.dcp_metadata import read_metadata
    saved = {k for k in read_metadata(ckpt).state_dict_metadata if k.startswith("model.")}
    assert saved and all(".lora_" in k for k in saved)  # only the adapters are checkpointed
    resumed = _trainer(tmp_path / "killed", **over, **{"train.resume": True})
    resumed.fit()

    def losses(run):
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [r["loss"] for r in map(json.loads, f) if r["event"] == "train"]
    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)


@pytest.mark.slow
def test_the_readme_lora_pipeline_runs_from_the_cli(tmp_path, monkeypatch, capsys):
    """LoRA SFT -> generate -> pairs -> LoRA HDPO -> eval, as the README's LoRA section runs it
    (fewer steps and tokens), from a directory that is not the checkout."""
    from polyfast.cli import main
    monkeypatch.chdir(tmp_path)
    tiny = ["model.tiny.num_layers=1", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128"]
    assert main(["sft", "run_dir=runs/lora/sft", "model.lora.r=8", "train.lr=1e-2",
                 "train.max_steps=40", "train.progress=false", *tiny]) == 0
    assert os.path.isfile("runs/lora/sft/final/adapter_model.safetensors")
    assert main(["generate", "--model", "runs/lora/sft", "--data", "demo:train", "--out",
                 "runs/lora/preds.jsonl", "--max-new-tokens", "12", "--sample"]) == 0
    assert main(["pairs", "--records", "demo:train", "--predictions", "runs/lora/preds.jsonl",
                 "--out", "runs/lora/pairs.jsonl"]) == 0
    assert main(["hdpo", "run_dir=runs/lora/hdpo", "model.path=runs/lora/sft/final",
                 "data.pairs=runs/lora/pairs.jsonl", "data.max_tokens=4096", "hdpo.distance=feature",
                 "model.lora.r=8", "train.lr=1e-3", "train.max_steps=3",
                 "train.progress=false"]) == 0
    with open("runs/lora/hdpo/final/adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath("runs/lora/sft/final")
    assert main(["eval", "--model", "runs/lora/hdpo", "--data", "demo:test", "--references",
                 "demo:train", "--limit", "20", "--out", "runs/lora/eval"]) == 0
    with open("runs/lora/eval/metrics.json") as f:
        assert json.load(f)["n"] == 20
