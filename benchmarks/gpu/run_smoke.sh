#!/usr/bin/env bash
# GPU smoke run: what one device call runs once the vLLM 0.22.1 bundle is staged
# (see /work/shared/gpu/README.md):
#
#   run(command="bash .gpu/d/stage.sh && bash benchmarks/gpu/run_smoke.sh", carry=[".gpu/d"])
#
# 1. builds a random-weight Qwen2.5-0.5B-shaped model in /tmp (make_model.py, no download);
# 2. runs tests/gpu (server, logprobs vs transformers, weight sync over gloo, bad manifest);
# 3. times generation through the server, a bare replica and in-process, and a weight sync (bench_gpu.py).
#
# Everything lands in $OUT (at most 8 files come back): gpu_tests.log, gpu_test_metrics.json,
# gpu_server.log, gpu_smoke.json, bench.log, bench_server.log. The whole script keeps
# inside SMOKE_BUDGET_S seconds (default 540) so the call ends inside its 600 s limit;
# each step is stopped with SIGINT, so the servers it started are shut down too.
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
SHAPE=${SHAPE:-qwen2.5-0.5b}
MODEL=${MODEL:-/tmp/vroll-gpu-model/$SHAPE}
BUDGET=${SMOKE_BUDGET_S:-540}
left() { echo $((BUDGET - SECONDS)); }

{
  echo "== $(date -u +%FT%TZ) $(uname -m), budget ${BUDGET}s"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>&1 || true
  $PY -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1
  [ -f "$MODEL/config.json" ] || $PY benchmarks/gpu/make_model.py --shape "$SHAPE" --out "$MODEL" 2>&1 | grep -v "Writing model shards"
} 2>&1 | tee "$OUT/bench.log"

# Tests: leave at least 240 s for the benchmark (three engine starts).
t_tests=$(( $(left) - 240 )); [ "$t_tests" -gt 360 ] && t_tests=360
echo "== tests (limit ${t_tests}s)" | tee -a "$OUT/bench.log"
VROLL_GPU_TEST_MODEL=$MODEL VROLL_GPU_METRICS=$OUT/gpu_test_metrics.json \
  timeout -s INT -k 20 "$t_tests" $PY -m pytest tests/gpu -x -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "== tests exit $tests_rc after ${SECONDS}s" | tee -a "$OUT/bench.log"

t_bench=$(( $(left) - 10 ))
echo "== benchmark (limit ${t_bench}s)" | tee -a "$OUT/bench.log"
timeout -s INT -k 20 "$t_bench" $PY benchmarks/gpu/bench_gpu.py --model "$MODEL" --out "$OUT/gpu_smoke.json" \
  --prompts "${PROMPTS:-64}" --max-tokens "${MAX_TOKENS:-128}" 2>&1 | tee -a "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "== benchmark exit $bench_rc after ${SECONDS}s; tests exit $tests_rc" | tee -a "$OUT/bench.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
