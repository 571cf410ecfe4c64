#!/usr/bin/env bash
# GRPO at user shapes (issue 29): benchmarks/grpo_user_shape.py, every point of the issue in TWO device calls
# on an 8-GPU machine: each leg (its own colocated vLLM and trainer) gets a GPU of its own and the eight run
# side by side, so a call lasts as long as its slowest leg: every leg stops by BUDGET seconds (default 570)
# after the call began, model builds included. Carry the vLLM
# bundle's last piece, TRL's and Liger's wheels and the tokenizer (vLLM staged per shared/gpu/README.md on
# the same x8 machine first):
#
#   run(kind="nvidia-h100-x8", carry=[".gpu/d", ".gpu/trl", ".gpu/liger", ".tokenizer"],
#       command="bash .gpu/d/stage.sh && CALL=1 bash benchmarks/gpu/run_user_shape.sh")
#   run(kind="nvidia-h100-x8", carry=[...the same...],
#       command="bash .gpu/d/stage.sh && CALL=2 bash benchmarks/gpu/run_user_shape.sh")
#   then, here: python benchmarks/grpo_user_shape.py --merge <a point's JSONs> --out benchmarks/results/gpu/...
#
# CALL=1, the two main points, one leg per GPU:
#   1.5b-4k (GPUs 0-3): Qwen2.5-1.5B shape, vocabulary 151,936, 16 prompts x 8 completions, 256..4096 tokens
#     (skew 3: mean ~1,200, one in ~8 over 2,000), fp32 weights + bf16 autocast, gradient checkpointing;
#     legs vroll-today (micro 2: three fp32 logits copies of 2 x 4,096 x 151,936), vroll (packed, chunked,
#     --max_tokens_per_micro_batch $TOKENS), trl and trl-liger (micro 8; TRL 1.16's GRPO has no padding_free).
#     Expected per leg: vLLM start 60-90 s, 3 steps of ~40-70 s.
#   7b-lora (GPUs 4-7): Qwen2.5-7B shape (untied lm_head), LoRA r=16 on all linear layers, bf16 weights,
#     8 prompts x 8, 256..4096; the same four legs, 2 steps (one measured), ~6-8 min.
# CALL=2, the largest completion length each side fits (1.5B shape, 8 prompts x 8, 2 steps; OOM is a result):
#   GPUs 0-3: 8,192 tokens: vroll-today, vroll, trl, trl-liger; GPUs 4-5: 16,384: vroll, trl;
#   GPUs 6-7: 12,288: vroll, trl.
# CALL=jobs runs the legs given in $JOBS (the one-GPU kinds: two legs in turn per call, LEG_S=280 STEPS=2).
# Results: $OUT/user_shape_<point>_<leg>.json and .log per leg; a failed leg leaves its log (and the others
# run on). With fewer GPUs than legs, legs share GPUs in turn (too slow for one call: use the x8 kind).
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
CALL=${CALL:-1}
BUDGET=${BUDGET:-570}
START=$(date +%s)
TOKENS=${TOKENS:-32768}
LEG_S=${LEG_S:-$BUDGET}  # one GPU runs its legs in turn: each stops after LEG_S seconds at most
[ -d /tmp/site/trl ] || $PY -m pip install -q --no-deps --no-index --target /tmp/site .gpu/trl/*.whl 2>&1 | tail -2
[ -d /tmp/site/liger_kernel ] || $PY -m pip install -q --no-deps --no-index --target /tmp/site .gpu/liger/*.whl \
  2>&1 | tail -2
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader | head -1

model() {  # the random-weight model folder of a shape, built once (the 7B in bf16: ~90 s)
  local dir=/tmp/vroll-gpu-model/$1-v151936
  [ -f "$dir/config.json" ] || $PY benchmarks/gpu/make_model.py --shape "$1" --vocab-size 151936 --out "$dir" \
    2>&1 | tail -1
}

point_args() {  # the benchmark's flags of a point
  case "$1" in
    1.5b-4k) echo "--prompts 16 --generations 8 --max-completion 4096 --steps 3" ;;
    1.5b-8k) echo "--prompts 8 --generations 8 --max-completion 8192 --steps 2" ;;
    1.5b-12k) echo "--prompts 8 --generations 8 --max-completion 12288 --steps 2" ;;
    1.5b-16k) echo "--prompts 8 --generations 8 --max-completion 16384 --steps 2" ;;
    # vLLM at 0.45: 15 GB of weights + the KV cache of 64 x 4K tokens (57 KB a token)
    7b-lora) echo "--prompts 8 --generations 8 --max-completion 4096 --steps 2 --lora --dtype bfloat16 --vllm-memory 0.45" ;;
  esac
}

leg() {  # POINT LEG GPU: one leg on one GPU, its output in $OUT
  local point=$1 name=$2 gpu=$3 shape=qwen2.5-1.5b micro=8
  [ "$point" = 7b-lora ] && shape=qwen2.5-7b
  [ "$name" = vroll-today ] && micro=2
  local tag=user_shape_${point}_${name} left=$((BUDGET - $(date +%s) + START))
  [ "$left" -gt "$LEG_S" ] && left=$LEG_S
  CUDA_VISIBLE_DEVICES=$gpu timeout -s INT -k 15 "$left" $PY benchmarks/grpo_user_shape.py \
    --model "/tmp/vroll-gpu-model/$shape-v151936" --legs "$name" $(point_args "$point") ${STEPS:+--steps $STEPS} \
    --micro "$micro" \
    --token-budget "$TOKENS" --vroll-flags "${VROLL_FLAGS:-}" --out "$OUT/$tag.json" 2>&1 \
    | grep -v "Warning\|warn(" > "$OUT/$tag.log"
  echo "$point $name (GPU $gpu): rc ${PIPESTATUS[0]}; $(grep -E "^  $name: [0-9.]+ s/step" "$OUT/$tag.log" | tail -1)"
}

case "$CALL" in
  jobs)  # JOBS="point:leg ..." given (one GPU: e.g. JOBS="1.5b-4k:vroll 1.5b-4k:trl" LEG_S=280); the shapes they use
     case "$JOBS" in *1.5b-*) model qwen2.5-1.5b ;; esac
     case "$JOBS" in *7b-*) model qwen2.5-7b ;; esac
     ;;
  1) model qwen2.5-1.5b & model qwen2.5-7b & wait
     JOBS="1.5b-4k:vroll-today 1.5b-4k:vroll 1.5b-4k:trl 1.5b-4k:trl-liger 7b-lora:vroll-today 7b-lora:vroll
           7b-lora:trl 7b-lora:trl-liger" ;;
  2) model qwen2.5-1.5b
     JOBS="1.5b-8k:vroll-today 1.5b-8k:vroll 1.5b-8k:trl 1.5b-8k:trl-liger 1.5b-16k:vroll 1.5b-16k:trl
           1.5b-12k:vroll 1.5b-12k:trl" ;;
  *) echo "unknown CALL $CALL (1 or 2)"; exit 2 ;;
esac
i=0
for job in $JOBS; do
  gpu=$((i % NGPU))
  if [ "$i" -ge "$NGPU" ]; then wait -n; fi  # fewer GPUs than legs: the next leg waits for a free one
  leg "${job%%:*}" "${job#*:}" "$gpu" &
  i=$((i + 1))
done
wait
ls "$OUT"
