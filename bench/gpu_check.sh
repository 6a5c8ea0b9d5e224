#!/usr/bin/env bash
# One prepared check for a GPU machine with PyTorch and Triton but no network (see bench/README.md):
# the CUDA tests (torchrun with NCCL among them), a profile of SFT and HDPO steps, the end-to-end
# training benchmark (Qwen2.5-1.5B shape, random init, packs of 8192 and 16384 tokens; the model
# switches side by side; one Qwen2.5-7B-shaped step), and the loss head's cost model calibrated
# on this GPU beside its measured time. Each part runs under its own time limit (GNU timeout kills
# the part's whole process group), every benchmark row is in its JSONL file as soon as it is
# measured, and the tables are rendered from those files last, whatever failed before: at most
# 8.5 minutes in all (the parts' limits). Optional wheels (liger-kernel, cut-cross-entropy, peft)
# are installed from .whl/ when present. Logs and JSONL rows land in $OUT (default
# /tmp/polyfast-gpu-check).
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

part tests 100 python3 -m pytest -q -rs -p no:cacheprovider tests/test_linear_ce_cuda.py \
  tests/test_joint_logprobs_cuda.py tests/test_gpu_path_cuda.py tests/test_prefix_sharing_cuda.py \
  tests/test_distributed_cuda.py
tail -12 "$OUT/tests.log"
# where a step's time goes, before any tuning
part profile 70 python3 -m polyfast.bench.profile --model qwen2.5-1.5b --max-tokens 8192 \
  --steps 2 --warmup 2 --mode-timeout 34 --out "$OUT/profile.jsonl"
# the targets: SFT's MFU; HDPO (live reference, precomputed, without prefix sharing) against it;
# model.liger and model.compile side by side (what "auto" should be on CUDA)
part train 180 python3 -m polyfast.bench.train --model qwen2.5-1.5b --max-tokens 8192 --steps 3 \
  --warmup 1 --modes sft:polyfast hdpo:polyfast hdpo:precomputed hdpo:unshared \
  sft:polyfast+liger sft:polyfast+compile --mode-timeout 50 --out "$OUT/train.jsonl"
part train_16k 70 python3 -m polyfast.bench.train --model qwen2.5-1.5b --max-tokens 16384 \
  --steps 2 --warmup 1 --modes sft:polyfast hdpo:polyfast --mode-timeout 34 \
  --out "$OUT/train_16k.jsonl"
# one Qwen2.5-7B-shaped full fine-tuning step: bf16 weights and AdamW state, activation checkpointing
part train_7b 55 python3 -m polyfast.bench.train --model qwen2.5-7b --max-tokens 8192 --steps 1 \
  --warmup 1 --modes sft:polyfast --activation-checkpointing --dtype bfloat16 --mode-timeout 50 \
  --out "$OUT/train_7b.jsonl"
# the loss head's cost model with this GPU's measured matmul rate and bandwidth, beside the measured
# time of both fused backends at the comparison shape
part roofline 35 bash -c "python3 -m polyfast.bench.roofline --calibrate | tail -3 && \
  python3 -m polyfast.bench.linear_ce --shapes 16384x2048x248320 --backends gemm triton \
  --out '$OUT/linear_ce.jsonl'"
tail -4 "$OUT/roofline.log"

echo
python3 -m polyfast.bench.profile --table "$OUT/profile.jsonl" 2>/dev/null || echo "profile: no rows"
echo
for b in train train_16k train_7b linear_ce; do
  if [ -s "$OUT/$b.jsonl" ]; then
    bench=${b%_16k}
    python3 -m "polyfast.bench.${bench%_7b}" --table "$OUT/$b.jsonl"
  else
    echo "$b: no rows"
  fi
  echo
done
