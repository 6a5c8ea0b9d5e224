"""Compile every loss-kernel variant polyfast can launch for Hopper and Ampere, without a GPU.

    python -m polyfast.bench.compile_check         # all variants, sm_90 / sm_80 / sm_86
    python -m polyfast.bench.compile_check --16bit --arch 90 80 --strict

Each variant (kernel x operand dtype x softcap x gradients or models, with the pinned config of
the GPU family that launches it) goes through ``triton.compile`` for a ``GPUTarget``
and Triton's own ``ptxas``; the row shows the shared memory the launch needs, the registers per
thread, the spill stores ptxas reports, and the tensor-core instructions in the machine code
(``HGMMA`` = wgmma on sm_90, ``HMMA`` = mma.sync). The last line counts

    compile_check: N variants, S spilling, T over shared memory, U without tensor cores (16-bit)

"without tensor cores" means a 16-bit variant whose code has no HGMMA on sm_90 (no HMMA on
sm_80 / sm_86). ``--strict`` exits 1 when a 16-bit variant spills, overflows shared memory or
lacks tensor cores. Autotuning candidates (POLYFAST_AUTOTUNE=1) are not pinned and not listed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from polyfast.kernels.configs import Variant, variants

# Shared memory a block may use (bytes, opt-in maximum) per architecture.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024}
SIXTEEN = ("bf16", "fp16")


@dataclass
class Result:
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0
    stack_bytes: int = 0
    tensor_core: str = ""
    seconds: float = 0.0
    error: str = ""


def _source(v):
    """The ASTSource of a variant: pointer and scalar types as the launcher passes them (the
    kernel module's SIGNATURES), the constexprs it sets, and the 16-byte divisibility of every
    pointer, H and row stride that the launchers guarantee (``configs.padded``)."""
    import triton
    from triton.compiler import ASTSource
    fn = v.kernel_fn()
    types, const = v.signature()
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1: run compile_check "
                           "in a process without it (python -m polyfast.bench.compile_check)")
    missing = set(const) - set(fn.arg_names)
    if missing:
        raise KeyError(f"{v.kernel}: the kernel has no arguments {sorted(missing)}: update its "
                       "SIGNATURES entry")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name, "i32")  # sizes and strides
        aligned = signature[name].startswith("*") or name in ("H", "stride_h", "stride_w") \
            or re.fullmatch(r"(H|sh|sw)\d", name)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=const, attrs=attrs)


def compile_one(v: Variant) -> Result:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    t0 = time.perf_counter()
    res = Result()
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by Triton...
    knobs.compilation.always_compile = True  # ...which a cache hit would skip
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(_source(v), target=GPUTarget("cuda", v.arch, 32),
                               options={"num_warps": v.config[3], "num_stages": v.config[4]})
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is a finding
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        res.seconds = time.perf_counter() - t0
        return res
    text = log.getvalue()
    res.shared = int(k.metadata.shared)
    res.registers = int(_last(r"Used (\d+) registers", text))
    res.spill_bytes = int(_last(r"(\d+) bytes spill stores", text))
    res.stack_bytes = int(_last(r"(\d+) bytes stack frame", text))
    res.tensor_core = _tensor_core_ops(k.asm["cubin"])
    res.seconds = time.perf_counter() - t0
    return res


def _last(pattern: str, text: str) -> str:
    found = re.findall(pattern, text)
    return found[-1] if found else "0"


def _tensor_core_ops(cubin: bytes) -> str:
    """Counts of tensor-core instructions in the SASS, e.g. 'HGMMA x24', or '' for none."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    ops = {op: len(re.findall(rf"\b{op}\.", sass)) for op in ("HGMMA", "HMMA")}
    return ", ".join(f"{op} x{n}" for op, n in ops.items() if n)


def problems(v: Variant, r: Result) -> list[str]:
    """What is wrong with a variant: 'error', 'spills', 'shared', 'no tensor cores' (16-bit)."""
    out = []
    if r.error:
        return ["error"]
    if r.spill_bytes:
        out.append("spills")
    if r.shared > SHARED_LIMIT[v.arch]:
        out.append("shared")
    if v.matmul and v.dtype in SIXTEEN and ("HGMMA" if v.arch >= 90 else "HMMA") not in r.tensor_core:
        out.append("no tensor cores")
    return out


def run(archs, dtypes, jobs: int, progress: bool = True) -> list[tuple[Variant, Result]]:
    vs = variants(archs, dtypes)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, jobs)) as pool:
        results = []
        for i, r in enumerate(pool.imap(compile_one, vs)):
            results.append(r)
            if progress:
                print(f"\r  compiled {i + 1}/{len(vs)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return list(zip(vs, results))


def summary(rows) -> dict:
    sixteen = [(v, r) for v, r in rows if v.dtype in SIXTEEN]
    return {"variants": len(rows),
            "spilling": sum(bool(r.spill_bytes) for _, r in rows),
            "over_shared": sum(r.shared > SHARED_LIMIT[v.arch] for v, r in rows),
            "no_tensor_cores_16bit": sum("no tensor cores" in problems(v, r) for v, r in sixteen),
            "errors": sum(bool(r.error) for _, r in rows),
            "bad_16bit": sum(bool(problems(v, r)) for v, r in sixteen)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="*", default=[90, 80, 86], choices=sorted(SHARED_LIMIT))
    p.add_argument("--16bit", dest="sixteen", action="store_true", help="bf16 / fp16 variants only")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None, help="also write the rows as JSON lines here")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if a 16-bit variant spills, overflows shared memory or lacks tensor cores")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions
    import triton
    dtypes = list(SIXTEEN) if args.sixteen else ["bf16", "fp16", "fp32", "tf32"]
    t0 = time.perf_counter()
    rows = run(args.arch, dtypes, args.jobs)
    from polyfast.tables import markdown_table
    table = []
    for v, r in rows:
        table.append([v.kernel, f"sm_{v.arch}", v.dtype, "yes" if v.softcap else "no", v.what,
                      "x".join(str(c) for c in v.config[:3] if c)
                      + f" w{v.config[3]} s{v.config[4]}", r.shared, r.registers, r.spill_bytes,
                      r.tensor_core or "none", ", ".join(problems(v, r)) or "ok"
                      if not r.error else r.error])
    print(f"compile_check: triton {triton.__version__}, {time.perf_counter() - t0:.0f} s\n")
    print(markdown_table(["kernel", "arch", "dtype", "softcap", "grads / models",
                          "config (N x V x H, warps, stages)", "shared B", "regs", "spill B",
                          "tensor cores", "status"], table))
    if args.json:
        with open(args.json, "w") as f:
            for v, r in rows:
                f.write(json.dumps({**asdict(v), **asdict(r), "problems": problems(v, r)}) + "\n")
    s = summary(rows)
    print(f"\ncompile_check: {s['variants']} variants, {s['spilling']} spilling, "
          f"{s['over_shared']} over shared memory, {s['no_tensor_cores_16bit']} without tensor "
          f"cores (16-bit)" + (f", {s['errors']} failed to compile" if s["errors"] else ""))
    return 1 if args.strict and (s["bad_16bit"] or s["errors"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
