#!/usr/bin/env bash
# GPU smoke run: what one device call runs once the vLLM 0.22.1 bundle is staged
# (see /work/shared/gpu/README.md). First, on your machine, export the tokenizer into the
# git-ignored .tokenizer/ (the GPU machine has no embedded model), then carry it:
#
#   python benchmarks/gpu/make_model.py --export-tokenizer .tokenizer
#   run(command="bash .gpu/d/stage.sh && bash benchmarks/gpu/run_smoke.sh", carry=[".gpu/d", ".tokenizer"])
#
# 1. builds a random-weight Qwen2.5-0.5B-shaped model in /tmp (make_model.py, no download);
# 2. runs tests/gpu (server, logprobs vs transformers, weight sync over gloo, bad manifest);
# 3. times generation through the server and in-process, at 128 tokens and at 1 token, and a
#    gloo weight sync into the server (serve_overhead.py --device cuda).
#
# Everything lands in $OUT: gpu_tests.log, gpu_test_metrics.json, gpu_server.log, gpu_smoke.json,
# bench.log. The whole script keeps inside SMOKE_BUDGET_S seconds (default 540) so the call ends
# inside its 600 s limit; each step is stopped with SIGINT, so the servers it started stop too.
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

# Tests: leave at least 240 s for the benchmark (two engine starts).
t_tests=$(( $(left) - 240 )); [ "$t_tests" -gt 360 ] && t_tests=360
echo "== tests (limit ${t_tests}s)" | tee -a "$OUT/bench.log"
VROLL_GPU_TEST_MODEL=$MODEL VROLL_GPU_METRICS=$OUT/gpu_test_metrics.json \
  timeout -s INT -k 20 "$t_tests" $PY -m pytest tests/gpu -x -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
echo "== tests exit $tests_rc after ${SECONDS}s" | tee -a "$OUT/bench.log"

t_bench=$(( $(left) - 10 ))
echo "== benchmark (limit ${t_bench}s)" | tee -a "$OUT/bench.log"
timeout -s INT -k 20 "$t_bench" $PY benchmarks/serve_overhead.py --device cuda --model "$MODEL" \
  --out "$OUT/gpu_smoke.json" --prompts "${PROMPTS:-64}" --max-tokens "${MAX_TOKENS:-128}" --max-model-len 1024 \
  --repeats 5 --one-token --sync-repeats 3 2>&1 | tee -a "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "== benchmark exit $bench_rc after ${SECONDS}s; tests exit $tests_rc" | tee -a "$OUT/bench.log"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
