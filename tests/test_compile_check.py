"""Every 16-bit loss-kernel variant compiles for sm_90 and sm_80 without a GPU (Triton's own
ptxas): no register spills, shared memory within the limit, wgmma on Hopper and mma on Ampere for
the kernels that multiply matrices (the "gemm" backend's elementwise kernels do not)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from polyfast.bench.compile_check import SHARED_LIMIT, Result, Variant, problems

pytestmark = pytest.mark.slow  # ptxas compiles every 16-bit variant

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_16bit_variants_spill_nothing_and_use_tensor_cores(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "polyfast.bench.compile_check", "--16bit", "--arch", "90",
                           "80", "--jobs", "2", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 2 archs x 2 dtypes x 2 softcaps x (forward, 4 backward variants (3 gradient sets filtered,
    # one exact), joint with 1-3 models and with 2-3 sharing a head, the "gemm" backend's 2
    # elementwise kernels)
    assert len(rows) == 96
    bad = [(r["kernel"], r["arch"], r["dtype"], r["softcap"], r["what"], r["problems"],
            r["registers"], r["spill_bytes"], r["shared"], r["error"]) for r in rows if r["problems"]]
    assert not bad, bad
    matmuls = [r for r in rows if not r["kernel"].startswith("gemm.")]
    assert len(matmuls) == 80
    assert all("HGMMA" in r["tensor_core"] for r in matmuls if r["arch"] == 90)
    assert all(0 < r["shared"] <= SHARED_LIMIT[r["arch"]] for r in matmuls)
    assert all(r["registers"] > 0 for r in rows)
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"compile_check: 96 variants, 0 spilling, 0 over shared memory, "
                        r"0 without tensor cores \(16-bit\)", last), last


def test_problems_are_reported():
    # the check itself can fail: each kind of finding is named
    v = Variant("linear_ce.bwd", 90, "hopper", "bf16", False, "dh+dw", (128, 128, 64, 8, 3))
    ok = Result(shared=1000, registers=200, tensor_core="HGMMA x20")
    assert problems(v, ok) == []
    assert problems(v, Result(shared=1000, registers=255, spill_bytes=8,
                              tensor_core="HGMMA x20")) == ["spills"]
    assert problems(v, Result(shared=SHARED_LIMIT[90] + 1, registers=200,
                              tensor_core="HGMMA x20")) == ["shared"]
    assert problems(v, Result(shared=1000, registers=200, tensor_core="HMMA x8")) == ["no tensor cores"]
    assert problems(v, Result(error="PTXASError: ...")) == ["error"]
    fp32 = Variant("linear_ce.bwd", 90, "hopper", "fp32", False, "dh+dw", (64, 64, 32, 8, 2))
    assert problems(fp32, Result(shared=1000, registers=200)) == []  # fp32 needs no tensor cores
    grad = Variant("gemm.grad", 90, "hopper", "bf16", False, "-", (8, 256, 0, 4, 1))
    assert problems(grad, Result(registers=50)) == []  # elementwise: no tensor cores expected
    assert problems(grad, Result(registers=128, spill_bytes=8)) == ["spills"]
