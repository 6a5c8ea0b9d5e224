"""The loss head's cost model (kernels/cost_model.py, bench.roofline): the numbers follow from the
design, and the backend "auto" picks at the Cut Cross-Entropy comparison shape fits its targets."""

import re

import pytest
from polyfast.bench import roofline
from polyfast.kernels import cost_model as lce
from polyfast.kernels.configs import CONFIGS

CCE = (16384, 2048, 248320)


def test_gemm_backend_is_predicted_within_the_targets_at_the_cce_shape():
    N, H, V = CCE
    assert lce.choose_fused(N, H, V) == "gemm"
    r = lce.predict("gemm", N, H, V)
    assert r["flops"] == 8 * N * H * V  # four GEMMs of 2NHV per vocabulary chunk
    assert r["atomic_bytes"] == 0
    assert r["ms"] <= 85.0 and r["memory_bytes"] <= 3e9
    # the GEMMs are compute-bound at 989 TFLOP/s; on top come the elementwise passes over the
    # fp32 logits: 4 bytes read a logit in the forward, 4 read and 2 (bf16) written backward
    gemms = 8 * N * H * V / 989e12
    elementwise = N * V * (4 + 4 + 2) / 3.35e12
    assert r["ms"] == pytest.approx((gemms + elementwise) * 1e3)


def test_fused_kernel_prediction_follows_its_filter_rate():
    N, H, V = CCE
    none_filtered = lce.predict("triton", N, H, V, pass_fraction=1.0)
    all_filtered = lce.predict("triton", N, H, V, pass_fraction=0.0)
    bn, bv = CONFIGS["hopper"]["bwd16"][:2]
    assert none_filtered["atomic_bytes"] == pytest.approx(4 * N * H * V * (1 / bn + 1 / bv))
    assert all_filtered["atomic_bytes"] == 0
    assert all_filtered["flops"] == 4 * N * H * V  # the two logit sweeps only
    assert all_filtered["ms"] < lce.predict("gemm", N, H, V)["ms"] < none_filtered["ms"]
    half = lce.predict("triton", N, H, V, pass_fraction=0.5)["ms"]
    assert all_filtered["ms"] < half < none_filtered["ms"]


def test_forward_only_calls_skip_the_logit_buffers():
    # a frozen model's log-probs: the fused forward writes no logits, the GEMM one does
    N, H, V = CCE
    assert lce.choose_fused(N, H, V, backward=False) == "triton"
    assert lce.predict("gemm", N, H, V, backward=False)["flops"] == 2 * N * H * V


def test_roofline_prints_the_table_and_the_auto_line(capsys):
    assert roofline.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    r = lce.predict("gemm", *CCE)
    assert out[-1] == (f"roofline: gemm N=16384 H=2048 V=248320: {r['ms']:.1f} ms, "
                       f"{r['memory_bytes'] / 1e9:.2f} GB")
    assert re.match(r"roofline: \S+ N=16384 H=2048 V=248320: [\d.]+ ms, [\d.]+ GB$", out[-1])
    table = [line for line in out if line.startswith("| 65536x1536x151936")]
    assert len(table) == 3  # gemm, triton unfiltered, triton at the given pass fraction


def test_measured_rates_replace_the_datasheet(capsys):
    """--matmul-tflops / --tbps (what --calibrate measures on a GPU) drive the prediction."""
    import dataclasses
    assert roofline.main(["--matmul-tflops", "700", "--tbps", "3.0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    spec = dataclasses.replace(lce.H100, tflops={**lce.H100.tflops, 2: 700.0}, tbps=3.0)
    auto = lce.choose_fused(*CCE, spec=spec)
    r = lce.predict(auto, *CCE, spec=spec)
    assert out[-1].startswith(f"roofline: {auto} N=16384") and f": {r['ms']:.1f} ms" in out[-1]
    assert r["ms"] > lce.predict(auto, *CCE)["ms"]  # slower rates, a longer prediction
    assert "700 TFLOP/s, 3 TB/s" in "\n".join(out)
