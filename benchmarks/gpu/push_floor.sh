#!/usr/bin/env bash
# The weight push of a Qwen2.5-1.5B shape on ONE GPU against the floors of that GPU (issue 30, item 1).
# One device call, under 5 minutes, once the vLLM 0.22.1 bundle is staged (/work/shared/gpu/README.md):
#
#   python benchmarks/gpu/make_model.py --export-tokenizer .tokenizer      # here, once
#   run(command="bash .gpu/d/stage.sh && bash benchmarks/gpu/push_floor.sh", carry=[".gpu/d", ".tokenizer"])
#
# 1. builds the random-weight 1.5B model in /tmp (make_model.py, no download);
# 2. push_floor.py: the floors between two processes on the GPU (NCCL, which normally refuses two
#    ranks on one device, recorded either way; CUDA IPC device copy; gloo with its device<->host copies);
# 3. weight_sync.py --device cuda --same-gpu: vroll's push from a trainer on the GPU (float32 weights,
#    cast to the server's bf16 while packing) into a server on the same GPU, over gloo, with its phases.
#
# $OUT gets push_floor.json, weight_sync_gpu.json and push_floor.log. Each step is bounded so the
# call ends inside PUSH_BUDGET_S (default 290 s); a stopped step stops its server (SIGINT).
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
SHAPE=${SHAPE:-qwen2.5-1.5b}
MODEL=${MODEL:-/tmp/vroll-gpu-model/$SHAPE}
BUDGET=${PUSH_BUDGET_S:-290}
DTYPE=${TRAINER_DTYPE:-float32}
left() { echo $((BUDGET - SECONDS)); }
LOG=$OUT/push_floor.log

{
  echo "== $(date -u +%FT%TZ) budget ${BUDGET}s, shape $SHAPE, trainer $DTYPE"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>&1 || true
  [ -f "$MODEL/config.json" ] || $PY benchmarks/gpu/make_model.py --shape "$SHAPE" --out "$MODEL" 2>&1 \
    | grep -v "Writing model shards"
  MIB=$($PY -c "import os,sys; print(sum(os.path.getsize(os.path.join('$MODEL', f)) for f in os.listdir('$MODEL') if f.endswith('.safetensors')) / 2**20)")
  echo "== floors for ${MIB} MiB (limit 80 s)"
  timeout -s INT -k 10 80 $PY benchmarks/gpu/push_floor.py --mb "$MIB" --out "$OUT/push_floor.json"
  echo "== floors exit $? after ${SECONDS}s"
  t=$(( $(left) - 10 ))
  echo "== push (limit ${t}s)"
  timeout -s INT -k 20 "$t" $PY benchmarks/weight_sync.py --device cuda --same-gpu --backend gloo --models dir \
    --model-dir "$MODEL" --trainer-dtype "$DTYPE" --repeats 3 --per-tensor-limit 4 --floor-mb 1024 \
    --out "$OUT/weight_sync_gpu.json"
  echo "== push exit $? after ${SECONDS}s"
} 2>&1 | tee "$LOG"
