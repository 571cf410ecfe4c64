#!/usr/bin/env bash
# The multimodal guide's script on real GPUs (issue 16): torchrun on all GPUs but the last, ZeRO-3, and
# vLLM started by the trainer on the last GPU (no server address given). Needs 2+ GPUs (nvidia-h200-x2):
#
#   run(kind="nvidia-h200-x2", command="bash .gpu/d/stage.sh && bash benchmarks/gpu/run_guide.sh",
#       carry=[".gpu/d", ".gpu/ds", ".tokenizer"])
#
# MODEL (default: the 3B-shaped VLM, vroll.testing.build_tiny_vlm), DATASET (default: synthetic REC data made
# here in VLM-R1's layout, 448 px images, /tmp/rec/rec.yaml; the guide's own rewards are picked for it), STEPS (3),
# REPORT_TO (default none: the image has no wandb; the guide's wandb would log offline if it had).
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
[ -d /tmp/site/deepspeed ] || $PY -m pip install -q --no-deps --no-index --target /tmp/site .gpu/ds/*.whl 2>&1 | tail -2
MODEL=${MODEL:-/tmp/vlm3b}
[ -f "$MODEL/config.json" ] || $PY -c "from vroll.testing import build_tiny_vlm; build_tiny_vlm('$MODEL', shape='3b', tokenizer='.tokenizer')"
if [ -z "${DATASET:-}" ]; then
  DATASET=$($PY -c "from vroll.tasks.rec import make_synthetic_rec; print(make_synthetic_rec('/tmp/rec', n=64, seed=0, size=448))")
fi
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
timeout -s INT -k 30 "${BUDGET:-560}" $PY -m torch.distributed.run --nproc_per_node="$((NGPU - 1))" --nnodes="1" \
    --node_rank="0" --master_addr="127.0.0.1" --master_port="12346" -m vroll grpo \
    --deepspeed configs/zero3.json --output_dir /tmp/guide-run --model_name_or_path "$MODEL" \
    --dataset_name "$DATASET" --image_root "$(dirname "$DATASET")" --per_device_train_batch_size 7 \
    --gradient_accumulation_steps 2 --logging_steps 1 --bf16 --torch_dtype bfloat16 --data_seed 42 \
    --report_to "${REPORT_TO:-none}" --gradient_checkpointing false --attn_implementation flash_attention_2 --num_iterations 1 \
    --max_steps "${STEPS:-3}" --run_name guide --save_steps 500 --save_only_model true --max_prompt_length 1024 \
    --max_completion_length 256 --use_vllm true --vllm_gpu_memory_utilization 0.7 --vllm_dtype bfloat16 \
    --num_generations 7 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/guide.log" | tail -40
rc=${PIPESTATUS[0]}
cp /tmp/guide-run/metrics.jsonl /tmp/guide-run/vllm-server.log "$OUT/" 2>/dev/null
pgrep -af "vroll serve" && echo "LEFTOVER vroll serve processes" || echo "no vroll serve left"
exit "$rc"
