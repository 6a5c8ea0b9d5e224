"""One benchmark harness: timing quantiles, peak memory, the machine, JSONL rows and a table.

Timing: ``triton.testing.do_bench`` on CUDA (median, p20, p80 in ms); on a CPU, wall-clock over
repeats after a warm-up. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on a CPU the
rise of the process's peak resident set over its level before the measured call, so each
measurement that reports CPU memory runs in a fresh process (``run_isolated``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import uuid

import torch

# where the benchmarks append their rows by default (--out): bench/results/ of this checkout, from
# whatever directory they are run
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    """Date, versions and device; ``run`` tells one invocation's rows from another's in a JSONL
    file that several runs appended to."""
    info = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "run": uuid.uuid4().hex[:12], "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = f"CPU {model}, {torch.get_num_threads()} threads"
    return info


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn, device: str, repeats: int = 5, warmup: int = 1) -> dict:
    """Time ``fn`` and measure the peak memory of its first call."""
    if device.startswith("cuda"):
        from triton.testing import do_bench
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2], "peak_mb": peak / 2**20}
    before = _rss_bytes()
    fn()  # also the warm-up
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"ms": statistics.median(times), "ms_p20": q[0], "ms_p80": q[-1],
            "peak_mb": max(peak, 0) / 2**20}


def guarded(fn, *args, **kwargs) -> dict:
    """``fn(*args, **kwargs)`` (a result dict), or {"error": ...} for any exception it raises, so
    that one failing row (out of memory, a compile error, a missing feature) is recorded and the
    benchmark goes on. CUDA's cache is emptied after a failure."""
    try:
        return fn(*args, **kwargs)
    except ImportError as e:
        return {"skipped": str(e)[:300]}
    except Exception as e:  # noqa: BLE001 - recorded in the row, and on stderr
        traceback.print_exc(file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        kind = "out of memory" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
        first = (str(e).strip().splitlines() or [""])[0]
        return {"error": f"{kind}: {first}"[:300]}


def run_isolated(module: str, args: list[str], timeout: float = 900) -> dict:
    """Run ``python -m module args`` in a fresh process; it prints one JSON object last. A crash,
    a timeout or unreadable output comes back as {"error": ...}."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                              text=True, timeout=timeout, cwd=root)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"no result line: {proc.stdout[-200:]!r}"}


def append_jsonl(path: str, rows: list[dict]) -> None:
    """Append rows and flush them to disk at once: a run cut short keeps what it measured."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


def read_runs(path: str, bench: str, run: str | None = None) -> list[dict]:
    """The rows of ``bench`` in a JSONL file: those of run ``run``, or of the file's last run."""
    with open(path) as f:
        rows = [r for r in (json.loads(line) for line in f if line.strip()) if r.get("bench") == bench]
    if not rows:
        return []
    run = run or rows[-1].get("run")
    return [r for r in rows if r.get("run") == run]
