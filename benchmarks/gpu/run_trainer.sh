#!/usr/bin/env bash
# GPU trainer run (one GPU): what a device call runs once the vLLM 0.22.1 bundle is staged
# (see /work/shared/gpu/README.md), TRL's wheel is carried in .gpu/trl and the tokenizer in .tokenizer
# (export it once here: python benchmarks/gpu/make_model.py --export-tokenizer .tokenizer):
#
#   run(command="bash .gpu/d/stage.sh && bash benchmarks/gpu/run_trainer.sh tests", carry=[".gpu/d", ".gpu/trl", ".tokenizer"])
#   run(command="bash .gpu/d/stage.sh && bash benchmarks/gpu/run_trainer.sh bench", carry=[".gpu/d", ".gpu/trl", ".tokenizer"])
#
#   run(command="bash .gpu/d/stage.sh && bash .model/f/stage.sh && bash benchmarks/gpu/run_trainer.sh parity",
#       carry=[".gpu/d", ".model/f", ".gpu/trl", ".tokenizer"])   # after .model/a-e (shared/gpu/README.md)
#
# tests: tests/gpu (server, sync, the GPU-sharing refusal, colocate with sleep mode, plain generate)
# bench: benchmarks/grpo_step.py on a random-weight Qwen2.5-0.5B-shaped model, 128 completion
#        tokens: vroll colocate and plain generate() against TRL without and with vLLM (colocate).
#        MAX_TOKENS=512 for the length users train at; BENCH_FLAGS="--reward vowels" so both sides
#        train every row (the addition reward is 0 on random weights: vroll would train none).
# parity: benchmarks/parity_trl.py on the real SmolLM2 weights (/tmp/smollm2): the demo recipe trained by
#        vroll colocate and TRL colocate, strict held-out accuracy of both, reward curves in one PNG.
#        Long runs: one leg per call (PARITY_LEGS=vroll, then PARITY_LEGS=trl), then
#        python benchmarks/parity_trl.py --merge vroll.json trl.json --out both.json
# Results land in $OUT; each phase stops itself inside BUDGET seconds (default 560).
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
MODEL=${MODEL:-/tmp/vroll-gpu-model/qwen2.5-0.5b}
BUDGET=${BUDGET:-560}
phase=${1:-tests}

[ -d /tmp/site/trl ] || $PY -m pip install -q --no-deps --no-index --target /tmp/site .gpu/trl/*.whl 2>&1 | tail -2
[ -f "$MODEL/config.json" ] || $PY benchmarks/gpu/make_model.py --shape qwen2.5-0.5b --out "$MODEL" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader

if [ "$phase" = parity ]; then
  [ -f /tmp/smollm2/config.json ] || { echo "no /tmp/smollm2: carry .model/a-f first"; exit 2; }
  timeout -s INT -k 20 "$BUDGET" $PY benchmarks/parity_trl.py --model /tmp/smollm2 --steps "${STEPS:-40}" \
    --legs "${PARITY_LEGS:-vroll,trl}" --out "$OUT/parity_trl_gpu.json" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/parity_trl_gpu.log" | tail -30
  exit "${PIPESTATUS[0]}"
fi
if [ "$phase" = tests ]; then
  VROLL_GPU_TEST_MODEL=$MODEL VROLL_GPU_METRICS=$OUT/gpu_test_metrics.json \
    timeout -s INT -k 20 "$BUDGET" $PY -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  exit "${PIPESTATUS[0]}"
fi
timeout -s INT -k 20 "$BUDGET" $PY benchmarks/grpo_step.py --model "$MODEL" --legs "${LEGS:-colocate,plain,trl,trl-colocate}" \
  --steps "${STEPS:-5}" --max-completion-length "${MAX_TOKENS:-128}" --out "$OUT/grpo_step_gpu.json" ${BENCH_FLAGS:-} 2>&1 \
  | grep -v "Warning\|warn(" | tee "$OUT/grpo_step_gpu.log" | tail -30
exit "${PIPESTATUS[0]}"
