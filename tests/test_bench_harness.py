"""The benchmark harness keeps what it measured: rows reach the JSONL file one at a time, a failing
row records its error and the run goes on, and the tables render from the file alone."""

import json
import pathlib
import shutil
import subprocess

import pytest
import torch
from polyfast.bench import harness
from polyfast.bench import train as bench_train
from polyfast.bench.linear_ce import main as linear_ce_main
from polyfast.bench.linear_ce import render as linear_ce_render

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_guarded_records_any_exception():
    assert harness.guarded(lambda: {"ms": 1.0}) == {"ms": 1.0}
    assert harness.guarded(lambda: 1 / 0)["error"].startswith("ZeroDivisionError")

    def missing():
        raise ImportError("no module named liger_kernel")
    assert harness.guarded(missing) == {"skipped": "no module named liger_kernel"}

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")
    assert harness.guarded(oom)["error"].startswith("out of memory")


@pytest.mark.slow
def test_run_isolated_reports_a_crash_and_a_timeout():
    assert "error" in harness.run_isolated("polyfast.bench.no_such_module", [])
    r = harness.run_isolated("http.server", ["0"], timeout=3)  # serves forever
    assert r == {"error": "timed out after 3 s"}


@pytest.mark.slow
def test_linear_ce_rows_are_written_as_measured_and_render_from_the_file(tmp_path):
    out = tmp_path / "rows.jsonl"
    linear_ce_main(["--shapes", "48x16x100", "--backends", "torch", "no_such_backend",
                    "--repeats", "1", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["torch", "no_such_backend"]
    assert rows[0]["ms"] > 0 and "error" in rows[1]  # the failing row did not stop the run
    assert len({r["run"] for r in rows}) == 1
    # a second run appends; --table shows the last run only
    linear_ce_main(["--shapes", "32x16x50", "--backends", "torch", "--repeats", "1", "--out", str(out)])
    last = harness.read_runs(str(out), "linear_ce")
    assert [(r["N"], r["backend"]) for r in last] == [(32, "torch")]
    table = linear_ce_render(harness.read_runs(str(out), "linear_ce", rows[0]["run"]))
    assert "48x16x100 | torch" in table and "no_such_backend" in table


def test_train_table_shows_failed_modes():
    info = {"bench": "train", "model": "demo", "max_tokens": 1024, "grad_accum": 1,
            "device": "CPU", "torch": "2", "date": "today"}
    rows = [{**info, "mode": "sft", "impl": "polyfast", "steps": 2, "tokens": 2000,
             "tokens_per_s": 1000.0, "step_ms": 1000.0, "peak_mb": 10.0, "mfu": None},
            {**info, "mode": "sft", "impl": "baseline", "error": "timed out after 36 s"}]
    text = bench_train.render(rows)
    assert "failed: timed out after 36 s" in text and "| sft | polyfast | 2 | 2000 |" in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
