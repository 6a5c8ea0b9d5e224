"""Where a training step's time goes: a few SFT and HDPO steps under ``torch.profiler``.

    python -m polyfast.bench.profile                                  # CPU: the demo model
    python -m polyfast.bench.profile --model qwen2.5-1.5b --max-tokens 8192   # a GPU

Each mode (``bench.train``'s modes: same data, configs and random init) runs in a fresh process:
``--warmup`` steps, then ``--steps`` steps under the profiler. The step's work is attributed to
the phases polyfast's trainers name (``polyfast.phases``): data (collate and host-to-device
copies), trunk forward, attention (forward and backward), loss head (the fused kernel, forward and
backward), reference (the frozen models' passes: HDPO's reference and LM critic), trunk backward,
optimizer (clipping, AdamW, schedule), and what no phase claims ("other": e.g. HDPO's pair loss
arithmetic). A backward op belongs to the phase its forward op ran in (the profiler's forward /
backward links), so attention's backward is attention's, not the trunk's.

What counts as work: on CUDA the GPU's kernels, copies and memsets, each attributed through the
host call that launched it; "idle" is the time in the profiled window when the GPU ran nothing
(launch gaps, host syncs, Python between kernels). On a CPU, the outermost operators; "idle" is
the host time outside any operator (Python, the data pipeline's pure-Python parts). Also
reported: kernels launched per step, host-to-device copies (count, MB, ms), host syncs per step
(CUDA runtime and driver synchronize calls, and blocking copies; none exist on a CPU) and the
host's own time per step (when it is close to the step time, the host bounds the step).

Each mode's row goes to bench/results/profile.jsonl (``--out``) as soon as it is measured; a
markdown table is printed, then one JSON line; ``--table JSONL`` prints a run's table. ``--trace
DIR`` keeps each mode's Chrome trace (open it in Perfetto or chrome://tracing).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict

import torch

from polyfast.phases import NAMES, PREFIX
from polyfast.tables import markdown_table

from .harness import RESULTS, append_jsonl, machine, read_runs, run_isolated

MODES = ["sft:polyfast", "hdpo:polyfast"]
CATEGORIES = ("data", "trunk forward", "attention", "loss head", "reference", "trunk backward",
              "optimizer", "other")
# a phase's own work -> its category; backward work goes by the phase of its forward op
_FORWARD = {"data": "data", "forward": "trunk forward", "attention": "attention",
            "loss_head": "loss head", "reference": "reference", "backward": "trunk backward",
            "optimizer": "optimizer", None: "other"}
_BACKWARD = {"forward": "trunk backward", "attention": "attention", "loss_head": "loss head",
             "reference": "reference", "backward": "trunk backward"}
STEP = "polyfast.bench/step"  # the profiled steps' own range (not a trainer phase)
_EVALUATE = "autograd::engine::evaluate_function"
HOST = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")
SYNCS = {"cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize",
         "cudaStreamWaitEvent_sync", "cudaMemcpy", "cudaMemcpy2D", "cuCtxSynchronize",
         "cuStreamSynchronize", "cuEventSynchronize", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2"}


# ---------------------------------------------------------------------------------------------
# the trace -> where the time went


def _nest(events: list[dict]) -> None:
    """Sort the host events by start (the longer first: parents before children, forward ops before
    their backward) and give each its enclosing event on the same thread (``_parent``) and whether
    an operator encloses it (``_in_op``)."""
    events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
    stacks: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        stack = stacks[(e["pid"], e["tid"])]
        while stack and e["ts"] >= stack[-1]["ts"] + stack[-1].get("dur", 0):
            stack.pop()
        parent = e["_parent"] = stack[-1] if stack else None
        e["_in_op"] = parent is not None and (parent.get("cat") == "cpu_op" or parent["_in_op"])
        stack.append(e)


def _phase_name(e: dict) -> str | None:
    name = e["name"]
    if e.get("cat") == "user_annotation" and name.startswith(PREFIX):
        phase = name[len(PREFIX):]
        return phase if phase in NAMES else None
    return None


class _Phases:
    """The innermost phase range containing a moment, any thread (for backward work that the
    autograd engine runs on its own thread, outside the trainer's ranges)."""

    def __init__(self, annotations: list[dict]):
        self.ranges = sorted(((e["ts"], e["ts"] + e["dur"], _phase_name(e)) for e in annotations
                              if _phase_name(e)), key=lambda r: r[0])
        self.starts = [r[0] for r in self.ranges]

    def at(self, ts: float) -> str | None:
        best = None
        for start, end, name in self.ranges[:bisect.bisect_right(self.starts, ts)]:
            # the latest-starting range around ts is the innermost; inside a frozen model's pass
            # everything is that pass's
            if start <= ts < end and best != "reference":
                best = name
        return best


def _label(events: list[dict], flows: list[dict], phases: _Phases) -> None:
    """Each host event's phase (``_phase``: the innermost range around it, "reference" winning
    over what it encloses) and, for backward work, the phase of its forward op (``_from``)."""
    at = {(e["pid"], e["tid"], e["ts"]): e for e in events if e.get("cat") == "cpu_op"}
    starts = {f["id"]: f for f in flows if f.get("ph") == "s"}
    backward_of = {}  # backward op (pid, tid, ts) -> its forward op's start
    for f in flows:
        if f.get("ph") == "f" and f["id"] in starts:
            s = starts[f["id"]]
            backward_of[(f["pid"], f["tid"], f["ts"])] = (s["pid"], s["tid"], s["ts"])
    for e in events:  # in ``_nest``'s order: parents and forward ops first
        parent = e["_parent"]
        own = _phase_name(e)
        if parent is None:
            inherited = phases.at(e["ts"]) if own is None else None
            e["_phase"] = own or inherited
            e["_from"] = None
        else:
            e["_phase"] = parent["_phase"] if parent["_phase"] == "reference" else (
                own or parent["_phase"])
            e["_from"] = parent["_from"]
        key = (e["pid"], e["tid"], e["ts"])
        if e.get("cat") == "cpu_op" and key in backward_of:
            forward = at.get(backward_of[key])
            e["_from"] = forward["_phase"] if forward is not None else "backward"
            if parent is not None and parent["name"].startswith(_EVALUATE):
                parent["_from"] = e["_from"]  # the engine's frame around the node is its work


def _category(e: dict | None) -> str:
    if e is None:
        return "other"
    if e["_from"] is not None:
        return _BACKWARD.get(e["_from"], "trunk backward")
    return _FORWARD.get(e["_phase"], "other")


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def analyse(trace: dict, cuda: bool, steps: int) -> dict:
    """Per-step milliseconds of each category, idle time, launches, copies and syncs, from a
    Chrome trace of ``steps`` steps each inside a ``STEP`` range (see the module docstring)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    host = [e for e in events if e.get("cat") in HOST]
    step_ranges = [e for e in host if e["name"] == STEP]
    if len(step_ranges) != steps:
        raise ValueError(f"the trace has {len(step_ranges)} step ranges, expected {steps}")
    t0 = min(e["ts"] for e in step_ranges)
    host_end = max(e["ts"] + e["dur"] for e in step_ranges)
    _nest(host)
    flows = [e for e in trace["traceEvents"] if e.get("cat") == "fwdbwd"]
    _label(host, flows, _Phases([e for e in host if e.get("cat") == "user_annotation"]))

    in_window = [e for e in host if t0 <= e["ts"] < host_end]
    if cuda:
        launch = {e["args"]["correlation"]: e for e in host
                  if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
        work = [(e, launch.get(e.get("args", {}).get("correlation"))) for e in events
                if e.get("cat") in DEVICE]
        work = [(e, h) for e, h in work if h is not None and t0 <= h["ts"] < host_end]
        syncs = sum(e["name"] in SYNCS for e in in_window
                    if e.get("cat") in ("cuda_runtime", "cuda_driver"))
        end = max([host_end] + [e["ts"] + e["dur"] for e, _ in work])
    else:  # the outermost operators are the work
        work = [(e, e) for e in in_window if e.get("cat") == "cpu_op" and not e["_in_op"]]
        syncs, end = None, host_end
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    intervals = []
    h2d = {"count": 0, "bytes": 0, "ms": 0.0}
    for e, h in work:
        s, f = max(e["ts"], t0), min(e["ts"] + e["dur"], end)
        if f <= s:
            continue
        per_cat[_category(h)] += (f - s) / 1e3
        intervals.append((s, f))
        if e.get("cat") == "gpu_memcpy" and "HtoD" in e["name"]:
            h2d["count"] += 1
            h2d["bytes"] += int(e.get("args", {}).get("bytes", 0) or 0)
            h2d["ms"] += e["dur"] / 1e3
    window = (end - t0) / 1e3
    busy = _union(intervals) / 1e3
    return {"step_ms": window / steps, "host_ms": (host_end - t0) / 1e3 / steps,
            "categories": {k: v / steps for k, v in per_cat.items()},
            "idle_ms": (window - busy) / steps, "busy_ms": busy / steps,
            "kernels": sum(e.get("cat") == "kernel" for e, _ in work) / steps if cuda else None,
            "h2d": {"count": h2d["count"] / steps, "mb": h2d["bytes"] / 2**20 / steps,
                    "ms": h2d["ms"] / steps} if cuda else None,
            "syncs": syncs / steps if syncs is not None else None}


# ---------------------------------------------------------------------------------------------
# one mode, profiled


def train_args(args, warmup: int) -> argparse.Namespace:
    """``bench.train``'s arguments for the same model, data and options."""
    from .train import parse_args
    argv = ["--model", args.model, "--max-tokens", str(args.max_tokens), "--data", args.data,
            "--warmup", str(warmup),
            "--scale", str(args.scale), "--dtype", args.dtype, "--grad-accum", str(args.grad_accum),
            "--lora-rank", str(args.lora_rank)]
    argv += [f for f, on in (("--liger", args.liger), ("--compile", args.compile),
                             ("--activation-checkpointing", args.activation_checkpointing)) if on]
    return parse_args(argv)[1]


def profile_mode(mode: str, args, trace_dir: str | None = None) -> dict:
    """Build ``mode`` as ``bench.train`` does, run its warm-up, profile ``args.steps`` steps."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from .train import RUNNERS, compile_warmup, mode_args, split_mode
    with tempfile.TemporaryDirectory(prefix="polyfast-bench-profile-") as tmp:
        targs = mode_args(mode, train_args(args, args.warmup))
        step, _, device, _, _ = RUNNERS[split_mode(mode)[0]](targs, tmp)
        cuda = device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        warmup = compile_warmup(targs)
        for s in range(warmup):
            step(s)
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            for s in range(warmup, warmup + args.steps):
                with record_function(STEP):
                    step(s)
            sync()
        wall = time.perf_counter() - t
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            result = analyse(json.load(f), cuda, args.steps)
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            shutil.copy(path, os.path.join(trace_dir, mode.replace(":", "-") + ".json"))
    return {**result, "steps": args.steps, "wall_ms": wall / args.steps * 1e3}


# ---------------------------------------------------------------------------------------------
# the table


def _cell(ms: float | None, total: float) -> str:
    return "" if ms is None else f"{ms:,.1f} ({100 * ms / total:.0f}%)"


def render(rows: list[dict]) -> str:
    """One line per mode: each category's ms per step (its share of the step)."""
    if not rows:
        return "profile: no rows"
    head = ["mode", "step ms", *CATEGORIES, "idle", "host ms", "kernels", "H2D copies",
            "host syncs"]
    table = []
    for r in rows:
        name = f"{r['mode']}:{r['impl']}"
        if "error" in r:
            table.append([name, f"failed: {r['error']}"] + [None] * (len(head) - 2))
            continue
        total = r["step_ms"]
        h2d = r.get("h2d")
        table.append([name, total, *(_cell(r["categories"][c], total) for c in CATEGORIES),
                      _cell(r["idle_ms"], total), r["host_ms"],
                      "n/a" if r.get("kernels") is None else r["kernels"],
                      f"{h2d['count']:.0f} ({h2d['mb']:,.1f} MB, {h2d['ms']:.2f} ms)" if h2d else "n/a",
                      "n/a" if r.get("syncs") is None else f"{r['syncs']:.0f}"])
    info = rows[0]
    what = "GPU kernels" if info.get("kernels") is not None else "the outermost CPU operators"
    return (f"Profile of {info['steps']} steps after {info['warmup']} warm-up, model "
            f"{info['model']}, packs of {info['max_tokens']} tokens, {info['device']}, torch "
            f"{info['torch']}, {info['date']}; ms per step ({what}; idle: nothing running):\n\n"
            + markdown_table(head, table))


def parse_args(argv=None):
    from .train import check_mode
    from .train_setup import MODELS

    def polyfast_mode(text: str) -> str:
        if check_mode(text).split("+")[0].endswith(":baseline"):
            raise argparse.ArgumentTypeError(f"{text}: the baselines have no phases to profile")
        return text
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="demo")
    p.add_argument("--modes", nargs="*", default=MODES, type=polyfast_mode, metavar="MODE",
                   help="bench.train's polyfast modes, with their options (e.g. sft:polyfast+liger)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=2048, help="pack capacity")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--data", choices=["demo", "sample"], default="demo")
    p.add_argument("--scale", type=int, default=1, help="copies of the demo data")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--liger", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--trace", metavar="DIR", help="keep each mode's Chrome trace in DIR")
    p.add_argument("--out", default=os.path.join(RESULTS, "profile.jsonl"))
    p.add_argument("--mode-timeout", type=float, default=3600, help="seconds per mode")
    p.add_argument("--table", metavar="JSONL", help="print the table of the last run in JSONL")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: profile one mode in this process
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(render(read_runs(args.table, "profile")))
        return 0
    if args.one:
        print(json.dumps(profile_mode(args.one, args, args.trace)))
        return 0
    info = machine()
    passthrough = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for mode in args.modes:
        r = run_isolated("polyfast.bench.profile", ["--one", mode, *passthrough],
                         timeout=args.mode_timeout)
        kind, impl = mode.split(":")
        row = {"bench": "profile", "model": args.model, "max_tokens": args.max_tokens,
               "warmup": args.warmup, "dtype": args.dtype, "liger": args.liger,
               "compile": args.compile, "activation_checkpointing": args.activation_checkpointing,
               **info, "mode": kind, "impl": impl, "steps": args.steps, **r}
        if "error" in r:
            print(f"  {mode}: failed: {r['error']}", file=sys.stderr)
        append_jsonl(args.out, [row])
        rows.append(row)
    print("\n" + render(rows))
    ok = [r for r in rows if "error" not in r]
    print(json.dumps({"bench": "profile", "machine": info, "model": args.model,
                      "step_ms": {f"{r['mode']}:{r['impl']}": r["step_ms"] for r in ok}}))
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
