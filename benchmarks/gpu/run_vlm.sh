#!/usr/bin/env bash
# Multimodal GRPO step time on one GPU: vroll colocate vs TRL 1.16 colocate on a random-weight
# Qwen2.5-VL-3B-shaped model with synthetic REC data (benchmarks/gpu/vlm_step.py). Needs the vLLM
# bundle staged (/work/shared/gpu/README.md), TRL's wheel in .gpu/trl and the tokenizer in .tokenizer
# (here, once: python benchmarks/gpu/make_model.py --export-tokenizer .tokenizer). One leg per call
# keeps each call inside the 10-minute limit (the 3B model is built once, in the first):
#
#   run(command="bash .gpu/d/stage.sh && LEGS=vroll bash benchmarks/gpu/run_vlm.sh", carry=[".gpu/d", ".gpu/trl", ".tokenizer"])
#   run(command="bash .gpu/d/stage.sh && LEGS=trl bash benchmarks/gpu/run_vlm.sh", carry=[".gpu/d", ".gpu/trl", ".tokenizer"])
#
# Both write $OUT/vlm_step_gpu.json (the second call merges into the first's when the machine is
# still warm; otherwise copy the first result back in as VLM_PREVIOUS=<file>).
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
BUDGET=${BUDGET:-560}
RESULT=/tmp/vroll-vlm-step.json
[ -d /tmp/site/trl ] || $PY -m pip install -q --no-deps --no-index --target /tmp/site .gpu/trl/*.whl 2>&1 | tail -2
[ -n "${VLM_PREVIOUS:-}" ] && [ -f "$VLM_PREVIOUS" ] && cp "$VLM_PREVIOUS" "$RESULT"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
$PY -c "import torchvision" 2>/dev/null || echo "note: no torchvision here; vLLM and TRL use the image-only Qwen2-VL processor"
timeout -s INT -k 20 "$BUDGET" $PY benchmarks/gpu/vlm_step.py --legs "${LEGS:-vroll,trl}" --steps "${STEPS:-5}" \
  --max-completion-length "${MAX_TOKENS:-256}" --out "$RESULT" 2>&1 | grep -v "Warning\|warn(" \
  | tee "$OUT/vlm_step_gpu.log" | tail -30
status=${PIPESTATUS[0]}
cp "$RESULT" "$OUT/vlm_step_gpu.json" 2>/dev/null
exit "$status"
