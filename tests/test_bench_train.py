"""bench/train.py: every mode runs and counts its tokens; model FLOPs match the parameters; the
GPU benchmark's model has Qwen2.5-1.5B's shape."""

import pytest
import torch

from bench import train as bench


def _args(**over):
    _, args = bench._args(["--steps", "1", "--warmup", "0", "--max-tokens", "1024"])
    for k, v in over.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("mode", bench.MODES)
def test_each_mode_runs_a_step_and_counts_real_tokens(mode):
    row = bench.run_one(mode, _args())
    assert (row["mode"], row["impl"]) == tuple(mode.split(":"))
    assert row["tokens"] > 0 and row["tokens_per_s"] > 0 and row["peak_mb"] > 0
    # a step holds whole examples (pairs: both sides), at most a pack's worth for polyfast
    if row["impl"] == "polyfast":
        assert row["tokens"] <= 1024


def test_flops_are_twice_the_matmul_parameters_per_token_plus_attention():
    from polyfast.config import TinyModelConfig
    from polyfast.data import byte_tokenizer
    from polyfast.model import tiny_config
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(TinyModelConfig(arch="qwen2", hidden_size=64, num_layers=3, num_heads=4,
                                      num_kv_heads=2, intermediate_size=96, vocab_size=1000),
                      byte_tokenizer())
    model = AutoModelForCausalLM.from_config(cfg)
    matmul = sum(m.weight.numel() for m in model.model.layers.modules()
                 if isinstance(m, torch.nn.Linear)) + model.lm_head.weight.numel()
    lengths = [5, 17, 40]
    attention = 2 * 3 * 64 * sum(n * n for n in lengths)  # QK^T and PV, causal half, per layer
    assert bench.flops_per_forward(cfg, lengths) == 2 * matmul * sum(lengths) + attention


def test_the_gpu_model_has_qwen25_15b_shape():
    from polyfast.config import TinyModelConfig
    from polyfast.data import byte_tokenizer
    from polyfast.model import tiny_config
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(TinyModelConfig(**bench.MODELS["qwen2.5-1.5b"]), byte_tokenizer())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e9, 2) == 1.54  # Qwen2.5-1.5B: 1.54B parameters, 1.31B without embeddings
    assert round((n - model.model.embed_tokens.weight.numel()) / 1e9, 2) == 1.31


def test_peak_flops_by_device_name():
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert bench.peak_flops("CPU AMD EPYC, 2 threads", None) is None
    assert bench.peak_flops("CPU", 1.5) == 1.5e12
