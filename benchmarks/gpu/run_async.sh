#!/usr/bin/env bash
# Async generation on two GPUs (issue 15): the server on GPU 0, the trainer on GPU 1, server mode
# synchronous against --async_generation true --max_staleness 1 (benchmarks/grpo_step.py's async legs),
# on the random-weight Qwen2.5-0.5B shape at 512 completion tokens. What a device call runs once the
# vLLM bundle is staged (/work/shared/gpu/README.md) and the tokenizer exported into .tokenizer:
#
#   run(kind="nvidia-h200-x2", command="bash .gpu/d/stage.sh && bash benchmarks/gpu/run_async.sh",
#       carry=[".gpu/d", ".tokenizer"])
#
# bench (default): -> grpo_step_async_gpu.json, grpo_step_async_gpu.log in $OUT.
#   STEPS (6), MAX_TOKENS (512), MAX_STALENESS (1) override.
# demo: benchmarks/async_demo.py on real SmolLM2 weights (/tmp/smollm2, carry .model/a-f as for
#   run_trainer.sh parity): the demo recipe sync vs async, strict held-out accuracy of both.
#   -> async_demo_gpu.json and the eval files. STEPS (50) overrides. On ONE GPU: TRAINER_GPUS= (empty) runs
#   the trainer on the machine's CPU cores beside the GPU server (weights pushed over gloo): the learning
#   comparison needs no second GPU (step times then measure a CPU trainer, not the GPU overlap).
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
MODEL=${MODEL:-/tmp/vroll-gpu-model/qwen2.5-0.5b}
BUDGET=${BUDGET:-560}
phase=${1:-bench}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
if [ "$phase" = demo ]; then
  [ -f /tmp/smollm2/config.json ] || { echo "no /tmp/smollm2: carry .model/a-f first"; exit 2; }
  timeout -s INT -k 20 "$BUDGET" $PY benchmarks/async_demo.py --model /tmp/smollm2 --steps "${STEPS:-50}" \
    --server-gpus 0 --trainer-gpus "${TRAINER_GPUS-1}" --out "$OUT/async_demo_gpu.json" 2>&1 | grep -v "Warning\|warn(" \
    | tee "$OUT/async_demo_gpu.log" | tail -30
  exit "${PIPESTATUS[0]}"
fi
[ -f "$MODEL/config.json" ] || $PY benchmarks/gpu/make_model.py --shape qwen2.5-0.5b --out "$MODEL" 2>&1 | tail -1
timeout -s INT -k 20 "$BUDGET" $PY benchmarks/grpo_step.py --model "$MODEL" --legs server-sync,server-async \
  --steps "${STEPS:-6}" --max-completion-length "${MAX_TOKENS:-512}" --max-staleness "${MAX_STALENESS:-1}" \
  --server-gpus 0 --trainer-gpus 1 --out "$OUT/grpo_step_async_gpu.json" 2>&1 | grep -v "Warning\|warn(" \
  | tee "$OUT/grpo_step_async_gpu.log" | tail -30
exit "${PIPESTATUS[0]}"
