"""bench/profile.py: a step's time split by phase, from a hand-made CUDA trace (launch links,
backward work by its forward op's phase, idle gaps, copies, syncs) and from real CPU steps."""

import random

import pytest
from polyfast.bench import profile as bench

TID, AUTOGRAD = 1, 2


def _x(name, cat, ts, dur, tid=TID, **args):
    e = {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": 0, "tid": tid}
    if args:
        e["args"] = args
    return e


def _launch(ts, corr, tid=TID, name="cudaLaunchKernel"):
    return _x(name, "cuda_runtime", ts, 1, tid, correlation=corr)


def _kernel(name, ts, dur, corr, cat="kernel", **args):
    return _x(name, cat, ts, dur, tid="stream 7", correlation=corr, **args)


def _flow(ph, ts, id, tid):
    return {"name": "fwdbwd", "cat": "fwdbwd", "ph": ph, "ts": ts, "id": id, "pid": 0, "tid": tid}


def _trace():
    """One step (0-100 us on the host): a copy, a trunk matmul, attention forward and (on the
    autograd thread) its backward, an unlinked gradient accumulation, a reference pass that
    launches an attention kernel, a synchronising optimizer, and a warm-up kernel before it all."""
    ev = [
        _launch(-50, 9), _kernel("warmup", -40, 30, 9),
        _x(bench.STEP, "user_annotation", 0, 100),
        _x("polyfast/data", "user_annotation", 0.5, 0.4),
        _launch(0.6, 5, name="cudaMemcpyAsync"),
        _kernel("Memcpy HtoD (Pinned -> Device)", 1, 2, 5, cat="gpu_memcpy", bytes=2**20),
        _x("polyfast/forward", "user_annotation", 1, 20),
        _x("aten::mm", "cpu_op", 2, 5), _launch(3, 1), _kernel("gemm", 10, 10, 1),
        _x("polyfast/attention", "user_annotation", 8, 6),
        _x("aten::sdpa", "cpu_op", 9, 4), _flow("s", 9, 7, TID), _launch(10, 2),
        _kernel("flash_fwd", 20, 5, 2),
        _x("polyfast/reference", "user_annotation", 22, 6),
        _x("polyfast/attention", "user_annotation", 23, 4),  # inside the reference: its
        _x("aten::sdpa", "cpu_op", 23.5, 2), _launch(24, 6), _kernel("flash_fwd", 26, 3, 6),
        _x("polyfast/backward", "user_annotation", 30, 40),
        _x("autograd::engine::evaluate_function: SdpaBackward0", "cpu_op", 31, 10, AUTOGRAD),
        _x("SdpaBackward0", "cpu_op", 32, 8, AUTOGRAD), _flow("f", 32, 7, AUTOGRAD),
        _launch(33, 3, AUTOGRAD), _kernel("flash_bwd", 40, 15, 3),
        _x("autograd::engine::evaluate_function: AccumulateGrad", "cpu_op", 45, 2, AUTOGRAD),
        _launch(46, 4, AUTOGRAD), _kernel("add", 60, 5, 4),
        _x("polyfast/optimizer", "user_annotation", 75, 20),
        _x("cudaStreamSynchronize", "cuda_runtime", 80, 10),
        _x("aten::_fused_adamw_", "cpu_op", 91, 3), _launch(92, 8, name="cuLaunchKernel"),
        _kernel("adamw", 95, 10, 8),
    ]
    for e in ev:  # kineto's runtime events have their own cat: drivers too
        if e["name"] == "cuLaunchKernel":
            e["cat"] = "cuda_driver"
    random.Random(0).shuffle(ev)  # the analysis may not lean on the trace's order
    return {"traceEvents": ev}


def test_cuda_trace_attribution():
    r = bench.analyse(_trace(), cuda=True, steps=1)
    cats = r["categories"]
    assert cats["data"] == pytest.approx(0.002)
    assert cats["trunk forward"] == pytest.approx(0.010)
    # attention: forward 5 us + its backward (linked through the flow) 15 us; the attention
    # inside the reference pass is the reference's
    assert cats["attention"] == pytest.approx(0.020)
    assert cats["reference"] == pytest.approx(0.003)
    assert cats["trunk backward"] == pytest.approx(0.005)  # the unlinked accumulation, by time
    assert cats["optimizer"] == pytest.approx(0.010)
    assert cats["loss head"] == cats["other"] == 0
    # window 0 .. 105 us (the last kernel ends after the host's step range); busy 50 us
    assert r["step_ms"] == pytest.approx(0.105) and r["host_ms"] == pytest.approx(0.100)
    assert r["busy_ms"] == pytest.approx(0.050) and r["idle_ms"] == pytest.approx(0.055)
    assert r["kernels"] == 6 and r["syncs"] == 1  # the warm-up kernel is not the step's
    assert r["h2d"] == {"count": 1, "mb": 1.0, "ms": pytest.approx(0.002)}


def test_a_trace_without_the_steps_is_refused():
    with pytest.raises(ValueError, match="1 step ranges, expected 2"):
        bench.analyse(_trace(), cuda=True, steps=2)


@pytest.mark.parametrize("mode", ["sft:polyfast", "hdpo:polyfast"])
def test_cpu_steps_split_into_phases(mode):
    args = bench.parse_args(["--steps", "1", "--warmup", "1", "--max-tokens", "1024"])
    r = bench.profile_mode(mode, args)
    cats = r["categories"]
    # every moment of the step is in one category or idle
    assert sum(cats.values()) + r["idle_ms"] == pytest.approx(r["step_ms"], rel=1e-6)
    for c in ("data", "trunk forward", "attention", "loss head", "trunk backward", "optimizer"):
        assert cats[c] > 0, c
    # the live reference's pass is HDPO's alone; little is left unclaimed
    assert (cats["reference"] > 0) == mode.startswith("hdpo")
    assert cats["other"] < 0.05 * r["step_ms"]
    assert r["syncs"] is None and r["kernels"] is None  # no such thing on a CPU
    row = {"mode": mode.split(":")[0], "impl": "polyfast", "model": "demo", "max_tokens": 1024,
           "warmup": 1, "device": "CPU", "torch": "x", "date": "d", **r}
    table = bench.render([row])
    assert f"| {mode} | " in table and "| trunk forward |" in table
