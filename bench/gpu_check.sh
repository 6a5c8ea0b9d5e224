#!/usr/bin/env bash
# One prepared check for a GPU machine with PyTorch and Triton but no network (see bench/README.md):
# the CUDA tests, the kernel benchmarks, then a slice of the end-to-end training benchmark
# (Qwen2.5-1.5B shape, random init). Each part runs under its own time limit (GNU timeout kills
# the part's whole process group), every benchmark row is in its JSONL file as soon as it is
# measured, and the tables are rendered from those files last, whatever failed before: at most
# 9.6 minutes in all (the parts' limits). Optional wheels (liger-kernel, cut-cross-entropy) are installed from .whl/
# when present. Logs and JSONL rows land in $OUT (default /tmp/polyfast-gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/polyfast-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# part NAME SECONDS COMMAND...: run one part under its limit, its output in $OUT/NAME.log
part() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "   $name: exit $rc$([ $rc -ge 124 ] && echo ' (time limit)') after $((SECONDS - t0)) s; last lines:"
    tail -15 "$OUT/$name.log" | sed 's/^/     /'
  else
    echo "   $name: ok in $((SECONDS - t0)) s"
  fi
}

part tests 90 python3 -m pytest -q -rs -p no:cacheprovider tests/test_linear_ce_cuda.py \
  tests/test_joint_logprobs_cuda.py tests/test_gpu_path_cuda.py tests/test_prefix_sharing_cuda.py
tail -12 "$OUT/tests.log"
# our fused backends against Cut Cross-Entropy and Liger, the CCE comparison shape first
part linear_ce 110 python3 -m polyfast.bench.linear_ce --grid check --out "$OUT/linear_ce.jsonl"
# (the peaked-rows shape, measured in run 4, is left out to make room for LoRA)
part joint_logprobs 45 python3 -m polyfast.bench.joint_logprobs --grid gpu --out "$OUT/joint_logprobs.jsonl"
# LoRA: the policy and its adapters-off reference read one head; one sweep for both vs two vs
# separate calls
part joint_logprobs_lora 30 python3 -m polyfast.bench.joint_logprobs --grid gpu --lora \
  --out "$OUT/joint_logprobs_lora.jsonl"
part train 170 python3 -m polyfast.bench.train --model qwen2.5-1.5b --max-tokens 8192 --steps 3 \
  --warmup 1 --modes sft:polyfast hdpo:polyfast hdpo:unshared --mode-timeout 55 \
  --out "$OUT/train.jsonl"
# LoRA against the full fine-tuning rows above: tokens/s and peak memory (HDPO's reference: the
# adapters switched off), then one 7B-shaped LoRA SFT step (bf16 weights, activation checkpointing)
part train_lora 80 python3 -m polyfast.bench.train --model qwen2.5-1.5b --max-tokens 8192 \
  --steps 3 --warmup 1 --modes sft:lora hdpo:lora --mode-timeout 38 --out "$OUT/train.jsonl"
part train_7b_lora 50 python3 -m polyfast.bench.train --model qwen2.5-7b --max-tokens 8192 \
  --steps 2 --warmup 1 --modes sft:lora --activation-checkpointing --dtype bfloat16 \
  --mode-timeout 45 --out "$OUT/train_7b.jsonl"

echo
for b in linear_ce joint_logprobs joint_logprobs_lora train train_7b; do
  if [ -s "$OUT/$b.jsonl" ]; then
    bench=${b%_lora}
    python3 -m "polyfast.bench.${bench%_7b}" --table "$OUT/$b.jsonl"
  else
    echo "$b: no rows"
  fi
  echo
done
