"""The GPU path's model options: Liger modules swapped in place of transformers' (parameters kept),
compiled decoder layers that compute what the eager ones do, a Qwen2.5-shaped vocabulary."""

import pytest
import torch

from polyfast.config import ModelConfig, TinyModelConfig
from polyfast.data import byte_tokenizer
from polyfast.errors import ConfigError
from polyfast.model import load_model, use_liger_modules
from tests.test_packed_model import gemma2_model
from tests.test_sft import param_grads, sft_trainer


def _tiny(arch="llama", **over):
    return ModelConfig(tiny=TinyModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2,
                                            num_kv_heads=1, intermediate_size=64), **over)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_liger_swaps_norms_and_mlps_and_keeps_every_parameter(arch):
    from liger_kernel.transformers import LigerGEGLUMLP, LigerRMSNorm, LigerSwiGLUMLP
    tok = byte_tokenizer()
    model = gemma2_model(tok) if arch == "gemma2" else load_model(_tiny(arch), tok)
    before = dict(model.named_parameters())
    norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
    counts = use_liger_modules(model)
    layers = model.config.num_hidden_layers
    assert counts == {"rms_norm": norms, "mlp": layers}
    assert norms == (4 if arch == "gemma2" else 2) * layers + 1  # per layer, and the final norm
    assert sum(isinstance(m, LigerRMSNorm) for m in model.modules()) == norms
    mlp = LigerGEGLUMLP if arch == "gemma2" else LigerSwiGLUMLP
    assert all(isinstance(layer.mlp, mlp) for layer in model.model.layers)
    after = dict(model.named_parameters())
    assert list(after) == list(before)  # same names: checkpoints and exports are unchanged
    assert all(after[k] is before[k] for k in before)  # the very same tensors, no copies
    if arch == "gemma2":  # (1 + w) scaling, computed the way Gemma does
        assert model.model.norm.offset == 1.0 and model.model.norm.casting_mode == "gemma"


def test_liger_needs_cuda():
    with pytest.raises(ConfigError, match="model.liger"):
        load_model(_tiny(liger=True), byte_tokenizer(), device=torch.device("cpu"))


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_eager_loss_and_gradients(tmp_path):
    eager = sft_trainer(tmp_path / "e")
    compiled = sft_trainer(tmp_path / "c", **{"model.compile": True})
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in compiled.model.model.layers)
    losses, grads = [], []
    for tr in (eager, compiled):
        out = tr.forward_backward([eager.step_packs(0)[0]])
        losses.append(out["loss"])
        grads.append(param_grads(tr))
    assert losses[1] == pytest.approx(losses[0].item(), rel=1e-5)
    assert (grads[1] - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max()


def test_tiny_vocab_size_gives_a_real_models_embedding_shape():
    tok = byte_tokenizer()
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                           intermediate_size=32, vocab_size=1000))
    assert load_model(cfg, tok).get_input_embeddings().weight.shape == (1000, 16)
    cfg.tiny.vocab_size = 10
    with pytest.raises(ConfigError, match="model.tiny.vocab_size"):
        load_model(cfg, tok)


def test_auto_options_follow_the_device_table(monkeypatch):
    """model.liger / model.compile "auto": the device's entry of AUTO_OPTIONS; explicit values
    win; auto never asks for Liger where it cannot run."""
    from polyfast import model as m
    from polyfast.config import ModelConfig
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = ModelConfig()
    assert (auto.liger, auto.compile) == ("auto", "auto")
    assert m.resolve_options(auto, cpu) == {"liger": False, "compile": False}
    assert m.resolve_options(ModelConfig(liger=True, compile=True), cpu) == {"liger": True,
                                                                           "compile": True}
    monkeypatch.setitem(m.AUTO_OPTIONS, "cuda", {"liger": True, "compile": True})
    assert m.resolve_options(auto, cuda, "qwen2") == {"liger": True, "compile": True}
    assert m.resolve_options(auto, cuda, "mistral")["liger"] is False  # no Liger modules for it
    assert m.resolve_options(ModelConfig(liger=False), cuda, "qwen2")["liger"] is False
    assert m.resolve_options(auto, cpu) == {"liger": False, "compile": False}
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # liger-kernel missing
    assert m.resolve_options(auto, cuda, "qwen2")["liger"] is False


def test_auto_option_values_are_checked():
    from polyfast.config import SFTConfig, load_config
    assert load_config(SFTConfig, None, ["model.compile=auto", "model.liger=false"]).model.liger is False
    with pytest.raises(ConfigError, match="model.liger"):
        load_config(SFTConfig, None, ["model.liger=sometimes"])
