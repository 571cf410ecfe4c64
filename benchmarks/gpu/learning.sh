#!/usr/bin/env bash
# Learning checks on real weights (issue 14), one GPU, colocate mode, the embedded SmolLM2-135M staged in
# /tmp/smollm2 (.model/a-f, see /work/shared/gpu/README.md). The `make demo` recipe (addition, strict correctness
# reward, 4 prompts x 8 completions, 24 tokens, dapo, lr 2e-5), run longer, in variants that differ in one knob:
#   mask:   --mask_truncated_completions true  (the demo's choice: a cut reply scores 0 AND is left out of the loss)
#   nomask: --mask_truncated_completions false (a cut reply scores 0 and is trained on: the missing-EOS penalty)
# Strict greedy held-out accuracy every EVAL_STEPS steps (eval/accuracy in metrics.jsonl) and at the end.
#   run(command="bash .gpu/d/stage.sh && bash .model/f/stage.sh && bash benchmarks/gpu/learning.sh", ...)
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
STEPS=${STEPS:-200}
EVAL_STEPS=${EVAL_STEPS:-25}
VARIANTS=${VARIANTS:-mask nomask}
[ -f /tmp/smollm2/config.json ] || { echo "no /tmp/smollm2: carry .model/a-f first"; exit 2; }
for v in $VARIANTS; do
  mask=true; [ "$v" = nomask ] && mask=false
  start=$(date +%s)
  timeout -s INT -k 20 "${BUDGET_EACH:-250}" $PY -m vroll grpo --vllm_mode colocate --model_name_or_path /tmp/smollm2 \
    --dataset_name addition --num_generations 8 --per_device_train_batch_size 32 --learning_rate 2e-5 \
    --max_completion_length 24 --temperature 1.0 --loss_type dapo \
    --reward_funcs addition_correct addition_format --reward_weights 1.0 0.0 \
    --mask_truncated_completions $mask --max_steps "$STEPS" --eval_steps "$EVAL_STEPS" --eval_n 200 \
    --save_steps 0 --save_final_model false --logging_steps 1 --seed 0 --output_dir "$OUT/learning_$v" 2>&1 \
    | grep -v "Warning\|warn(" > "$OUT/learning_$v.log"
  echo "$v: exit ${PIPESTATUS[0]} in $(( $(date +%s) - start )) s"
  grep -h '"eval/accuracy"' "$OUT/learning_$v/metrics.jsonl" 2>/dev/null \
    | python3 -c "import sys,json; [print('  step', r.get('step'), 'eval/accuracy', r['eval/accuracy'], 'truncated', r.get('eval/truncated')) for r in map(json.loads, sys.stdin)]"
  rm -rf "$OUT/learning_$v/final" "$OUT/learning_$v"/checkpoint-*
done
