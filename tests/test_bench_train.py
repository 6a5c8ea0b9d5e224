"""bench/train.py: every mode runs and counts its tokens; model FLOPs match the parameters; the
GPU benchmark's model has Qwen2.5-1.5B's shape."""

import pytest
import torch
from polyfast.bench import train as bench


def _args(**over):
    _, args = bench.parse_args(["--steps", "1", "--warmup", "0", "--max-tokens", "1024"])
    for k, v in over.items():
        setattr(args, k, v)
    return args


@pytest.mark.slow
@pytest.mark.parametrize("mode", bench.MODES + bench.LORA_MODES)
def test_each_mode_runs_a_step_and_counts_real_tokens(mode):
    row = bench.run_one(mode, _args())
    assert (row["mode"], row["impl"]) == tuple(mode.split(":"))
    assert row["tokens"] > 0 and row["tokens_per_s"] > 0 and row["peak_mb"] > 0
    # a step holds whole examples (pairs: both sides), at most a pack's worth for polyfast
    if row["impl"] in ("polyfast", "unshared", "lora"):
        assert row["computed_tokens"] <= 1024
    # HDPO credits pair tokens (the prompt once per side): prefix sharing computes fewer
    if mode in ("hdpo:polyfast", "hdpo:lora"):
        assert row["computed_tokens"] < row["tokens"]
    else:
        assert row["computed_tokens"] == row["tokens"]


def test_group_work_counts_pair_tokens_and_bottom_right_attention():
    from polyfast.data.groups import GroupExample
    g = GroupExample((1,) * 10, ((2,) * 3, (3,) * 5), ((0, 0, 1),), "b")
    shared = bench.group_work([g])
    assert shared["tokens"] == 2 * 10 + 3 + 5 and shared["lengths"] == [13, 5]
    assert shared["attn_sq"] == 13 ** 2 + (2 * 5 * 15 - 5 ** 2) and shared["bucket"] == "b"
    import dataclasses
    flat = bench.group_work([dataclasses.replace(g, shared=False)])
    assert flat["tokens"] == shared["tokens"] and flat["lengths"] == [13, 15]
    assert flat["attn_sq"] == 13 ** 2 + 15 ** 2
    assert bench.prompt_share([g]) == {"b": 20 / 28}


def test_mode_selects_the_modes_of_a_kind_and_the_bucket_table_shows_the_gain():
    _, args = bench.parse_args(["--mode", "hdpo"])
    assert args.modes == ["hdpo:polyfast", "hdpo:unshared", "hdpo:baseline"]
    rows = [{"mode": "hdpo", "impl": impl, "steps": 2, "tokens": 100, "tokens_per_s": tps,
             "step_ms": 1.0, "peak_mb": 1.0, "model": "demo", "max_tokens": 64, "grad_accum": 1,
             "device": "CPU", "torch": "x", "date": "d", "prompt_share": {"a": 0.5},
             "buckets": {"a": {"tokens_per_s": tps, "flops": 1e6 / tps}}}
            for impl, tps in (("polyfast", 300.0), ("unshared", 200.0), ("baseline", 100.0))]
    out = bench.render(rows)
    assert "shared / unshared: 1.50" in out
    assert "| a | 0.5 | 1.5 | 300.0 | 200.0 | 100.0 | 1.5 |" in out


def test_flops_are_twice_the_matmul_parameters_per_token_plus_attention():
    from transformers import AutoModelForCausalLM

    from polyfast.config import TinyModelConfig
    from polyfast.data import byte_tokenizer
    from polyfast.model import tiny_config
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
    from transformers import AutoModelForCausalLM

    from polyfast.config import TinyModelConfig
    from polyfast.data import byte_tokenizer
    from polyfast.model import tiny_config
    cfg = tiny_config(TinyModelConfig(**bench.MODELS["qwen2.5-1.5b"]), byte_tokenizer())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e9, 2) == 1.54  # Qwen2.5-1.5B: 1.54B parameters, 1.31B without embeddings
    assert round((n - model.model.embed_tokens.weight.numel()) / 1e9, 2) == 1.31


def test_the_7b_model_has_qwen25_7b_shape_and_lora_trains_a_sliver_of_it():
    from transformers import AutoModelForCausalLM

    from polyfast.config import LoraConfig, TinyModelConfig
    from polyfast.data import byte_tokenizer
    from polyfast.lora import add_adapters, trainable_count
    from polyfast.model import tiny_config
    cfg = tiny_config(TinyModelConfig(**bench.MODELS["qwen2.5-7b"]), byte_tokenizer())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 7.62  # Qwen2.5-7B
        add_adapters(model, LoraConfig(r=16))
    trains, total = trainable_count(model)
    assert trains == 28 * 16 * (2 * 3584 + 2 * 3584 + 2 * (3584 + 512) + 3 * (3584 + 18944))


def test_peak_flops_by_device_name():
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert bench.peak_flops("CPU AMD EPYC, 2 threads", None) is None
    assert bench.peak_flops("CPU", 1.5) == 1.5e12


def test_repeated_rounds_keep_each_modes_fastest_round_and_bucket():
    def row(impl, attempt, tps, bucket_tps):
        return {"mode": "hdpo", "impl": impl, "attempt": attempt, "tokens_per_s": tps,
                "buckets": {"a": {"tokens_per_s": bucket_tps, "flops": 1.0}}}
    rows = [row("polyfast", 0, 10.0, 5.0), row("unshared", 0, 8.0, 4.0),
            row("polyfast", 1, 12.0, 4.5), row("unshared", 1, 7.0, 6.0)]
    best = {r["impl"]: r for r in bench.best_rounds(rows)}
    assert best["polyfast"]["tokens_per_s"] == 12.0 and best["polyfast"]["attempt"] == 1
    assert best["polyfast"]["rounds_tokens_per_s"] == [10.0, 12.0]
    assert best["polyfast"]["buckets"]["a"]["tokens_per_s"] == 5.0  # per bucket, its own best
    assert best["unshared"]["tokens_per_s"] == 8.0
    assert best["unshared"]["buckets"]["a"]["tokens_per_s"] == 6.0
