#!/usr/bin/env bash
# GRPO at user shapes on one GPU (issue 29): benchmarks/grpo_user_shape.py, ONE leg per device call
# (each leg starts its own colocated vLLM and trains a few long steps: one leg fills most of a
# 10-minute call). Carry the vLLM bundle's last piece, TRL's and Liger's wheels and the tokenizer:
#
#   run(command="bash .gpu/d/stage.sh && POINT=1.5b-4k LEG=vroll bash benchmarks/gpu/run_user_shape.sh",
#       carry=[".gpu/d", ".gpu/trl", ".gpu/liger", ".tokenizer"])
#   ... LEG=trl, then LEG=trl-liger (same POINT), on the warm machine (the model folder is kept in /tmp)
#   python benchmarks/grpo_user_shape.py --merge <the three JSONs> --out benchmarks/results/gpu/user_shape_1.5b-4k.json
#
# Points (POINT):
#   1.5b-4k   Qwen2.5-1.5B shape, vocabulary 151,936, 16 prompts x 8 completions, 256..4096 tokens (skew 3:
#             mean ~1,200, one in ~8 over 2,000), fp32 weights + bf16 autocast, gradient checkpointing.
#             Expected per leg: model build ~30 s (first call only), vLLM start 60-90 s, steps of ~40-70 s
#             (generation ~30 s, bound by the 4,096-token tail; training 10-30 s): 3 steps, ~5 min.
#   1.5b-8k   the same at 256..8192 and 8 prompts x 8: the longest completions; which side fits (OOM is a result).
#             Expected: generation ~60 s a step (8K tail), ~6-7 min per leg with STEPS=2.
#   7b-lora   Qwen2.5-7B shape (untied lm_head), LoRA r=16 on all linear layers, bf16 weights, 8 prompts x 8,
#             256..4096. Expected: model build ~90 s (first call only), vLLM start ~90 s, steps ~80-100 s:
#             STEPS=2 (one measured), ~6-8 min. Keep the machine warm between legs: the 7B folder is 15 GB.
# MICRO (completions per micro-batch) defaults per leg: vroll today keeps (micro, C, 151936) fp32 logits
# three times, so it runs micro 2 at 4K (2 x 4,096 x 151,936 x 4 B = 5 GB a copy); TRL's lm_head is chunked:
# micro 8. VROLL_FLAGS adds the vroll leg's flags (phase 2: packing, token budget, chunked logps).
# Each call stops itself inside BUDGET seconds (default 560); results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
POINT=${POINT:-1.5b-4k}
LEG=${LEG:-vroll}
BUDGET=${BUDGET:-560}
case "$POINT" in
  1.5b-4k) SHAPE=qwen2.5-1.5b; ARGS="--prompts 16 --generations 8 --max-completion 4096"; STEPS=${STEPS:-3} ;;
  1.5b-8k) SHAPE=qwen2.5-1.5b; ARGS="--prompts 8 --generations 8 --max-completion 8192"; STEPS=${STEPS:-2} ;;
  7b-lora) SHAPE=qwen2.5-7b  # vLLM at 0.45: 15 GB of weights + the KV cache of 64 x 4K tokens (57 KB a token)
           ARGS="--prompts 8 --generations 8 --max-completion 4096 --lora --dtype bfloat16 --vllm-memory 0.45"
           STEPS=${STEPS:-2} ;;
  *) echo "unknown POINT $POINT (1.5b-4k, 1.5b-8k, 7b-lora)"; exit 2 ;;
esac
case "$LEG" in
  vroll) MICRO=${MICRO:-2} ;;
  *) MICRO=${MICRO:-8} ;;
esac
MODEL=/tmp/vroll-gpu-model/$SHAPE-v151936
[ -d /tmp/site/trl ] || $PY -m pip install -q --no-deps --no-index --target /tmp/site .gpu/trl/*.whl 2>&1 | tail -2
[ "$LEG" != trl-liger ] || [ -d /tmp/site/liger_kernel ] || \
  $PY -m pip install -q --no-deps --no-index --target /tmp/site .gpu/liger/*.whl 2>&1 | tail -2
[ -f "$MODEL/config.json" ] || $PY benchmarks/gpu/make_model.py --shape "$SHAPE" --vocab-size 151936 --out "$MODEL" \
  2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
timeout -s INT -k 20 "$BUDGET" $PY benchmarks/grpo_user_shape.py --model "$MODEL" --legs "$LEG" $ARGS \
  --steps "$STEPS" --micro "$MICRO" --vroll-flags "${VROLL_FLAGS:-}" --vroll-name "${VROLL_NAME:-vroll}" \
  --out "$OUT/user_shape_${POINT}_${VROLL_NAME:-$LEG}.json" 2>&1 | grep -v "Warning\|warn(" \
  | tee "$OUT/user_shape_${POINT}_${VROLL_NAME:-$LEG}.log" | tail -30
exit "${PIPESTATUS[0]}"
