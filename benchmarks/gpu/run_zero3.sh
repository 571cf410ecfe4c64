#!/usr/bin/env bash
# ZeRO-3 at world size 1 on one GPU, 3B-shaped VLM, colocate mode (issue 16): peak memory with and
# without ZeRO-3 offload, seconds per step. DeepSpeed is not on the GPU image: its wheels (built on
# the CPU machine, pure Python: DS_BUILD_OPS=0) travel in .gpu/ds and go into /tmp/site:
#
#   run(command="bash .gpu/d/stage.sh && bash benchmarks/gpu/run_zero3.sh", carry=[".gpu/d", ".gpu/ds", ".tokenizer"])
#
# (after .gpu/a-c as in /work/shared/gpu/README.md). LEGS=zero3 or LEGS=zero3-offload runs one leg.
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
[ -d /tmp/site/deepspeed ] || $PY -m pip install -q --no-deps --no-index --target /tmp/site .gpu/ds/*.whl 2>&1 | tail -2
$PY -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
timeout -s INT -k 20 "${BUDGET:-560}" $PY benchmarks/gpu/zero3_vlm.py --legs "${LEGS:-zero3,zero3-offload}" \
  --steps "${STEPS:-3}" --out "$OUT/zero3_vlm.json" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/zero3_vlm.log" | tail -40
exit "${PIPESTATUS[0]}"
