#!/usr/bin/env bash
# One prepared check for a GPU machine with PyTorch and Triton but no network (see bench/README.md):
# the CUDA tests, the kernel benchmark grids, then a 2-minute slice of the end-to-end training
# benchmark (Qwen2.5-1.5B shape, random init). Each part has its own time limit; all together stay
# under 9 minutes. The tables come last. Optional wheels (liger-kernel, cut-cross-entropy) are
# installed from .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/polyfast-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

echo "== CUDA tests"
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_linear_ce_cuda.py \
  tests/test_joint_logprobs_cuda.py tests/test_gpu_path_cuda.py tests/test_linear_ce_triton.py \
  tests/test_joint_logprobs.py tests/test_linear_ce.py 2>&1 | tee "$OUT/tests.log" | tail -25

echo "== benchmark grids"
timeout 150 python3 -m bench.linear_ce --grid gpu --out "$OUT/linear_ce.jsonl" \
  > "$OUT/bench.md" 2> "$OUT/bench.err" || { echo "linear_ce bench failed:"; tail -20 "$OUT/bench.err"; }
timeout 75 python3 -m bench.joint_logprobs --grid gpu --out "$OUT/joint_logprobs.jsonl" \
  > "$OUT/bench_joint.md" 2> "$OUT/bench_joint.err" || { echo "joint bench failed:"; tail -20 "$OUT/bench_joint.err"; }

echo "== end-to-end training slice"
timeout 150 python3 -m bench.train --model qwen2.5-1.5b --max-tokens 8192 --steps 4 --warmup 2 \
  --out "$OUT/train.jsonl" > "$OUT/bench_train.md" 2> "$OUT/bench_train.err" \
  || { echo "train bench failed or timed out:"; tail -20 "$OUT/bench_train.err"; }
cat "$OUT/bench.md" "$OUT/bench_joint.md" "$OUT/bench_train.md"
