#!/usr/bin/env bash
# Multi-GPU measurements (TP and DP): what a device call runs once the vLLM 0.22.1 bundle is
# staged (see /work/shared/gpu/README.md; carry .gpu/a..c first on a fresh machine) and the tokenizer
# is exported here into .tokenizer (python benchmarks/gpu/make_model.py --export-tokenizer .tokenizer):
#
#   run(kind="nvidia-h200-x2", command="bash .gpu/d/stage.sh && bash benchmarks/gpu/run_multi.sh serve", carry=[".gpu/d", ".tokenizer"])
#   run(kind="nvidia-h200-x4", command="bash .gpu/d/stage.sh && bash benchmarks/gpu/run_multi.sh sync", carry=[".gpu/d", ".tokenizer"])
#
# serve:  a random-weight Qwen2.5-1.5B-shaped model (make_model.py); serve_overhead.py three times:
#         TP=1 on GPU 0 (server + in-process), TP=2 on GPUs 0,1 (server + in-process, both TP=2),
#         DP=2 on GPUs 0,1 (server only: the in-process baseline has no DP); each run also times a
#         gloo weight sync into the server. PROMPTS, MAX_TOKENS, REPEATS, SYNC_REPEATS override the sizes.
#         -> serve_tp1.json serve_tp2.json serve_dp2.json, serve.log. Needs 2 GPUs (x2 is enough).
# sync:   full weight sync over NCCL (weight_sync.py --backend nccl --device cuda --models dir): the
#         trainer on GPU 0, the server on the next dp*tp GPUs. Wants nvidia-h200-x4 (3 GPUs:
#         --tp 2 --dp 1, then --tp 1 --dp 2); on x2 (2 GPUs) it runs --tp 1 --dp 1 instead. Then,
#         if time is left, builds the Qwen2.5-7B shape (~14 GB, ~1 min) and syncs it the same way.
#         -> sync_<layout>.json, sync_7b_<layout>.json, sync.log.
# sync7b: the 7B part of sync alone (for a second call when sync ran out of time).
#
# Results land in $OUT (at most 8 files come back). Each phase stops itself inside BUDGET seconds
# (default 560); each step runs under `timeout -s INT`, so the servers it started are shut down too.
set -uo pipefail
cd "$(dirname "$0")/../.."
. benchmarks/gpu/env.sh
# NVLink multicast stays off on these machines (KINDS.md); vLLM's symmetric-memory all-reduce
# would only probe for it and fall back, so skip it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
MODEL=${MODEL:-/tmp/vroll-gpu-model/qwen2.5-1.5b}
MODEL7B=${MODEL7B:-/tmp/vroll-gpu-model/qwen2.5-7b}
BUDGET=${BUDGET:-560}
phase=${1:-serve}
left() { echo $((BUDGET - SECONDS)); }
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
LOG=$OUT/$phase.log
: > "$LOG"
say() { echo "== $* (${SECONDS}s)" | tee -a "$LOG"; }
slot() { local t=$(( $(left) - $2 )); [ "$t" -lt "$1" ] && echo "$t" || echo "$1"; }  # min(CAP, left - RESERVE)
summary=()

build() {  # build SHAPE FOLDER LIMIT_S: into FOLDER.part, renamed once complete (a cut-off build leaves no FOLDER)
  [ -f "$2/config.json" ] && return 0
  say "building $1 into $2 (limit ${3}s)"
  rm -rf "$2.part"
  timeout -s INT -k 20 "$3" $PY benchmarks/gpu/make_model.py --shape "$1" --out "$2.part" 2>&1 \
    | grep -v "Writing model shards" | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] && mv -T "$2.part" "$2"
}

{
  echo "== $(date -u +%FT%TZ) phase $phase, $GPUS GPU(s), budget ${BUDGET}s"
  nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv,noheader 2>&1 || true
  nvidia-smi topo -m 2>&1 | head -12 || true
  $PY -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__, 'gpus', torch.cuda.device_count())" 2>&1 | tail -1
} 2>&1 | tee -a "$LOG"

serve_run() {  # serve_run NAME LIMIT_S GPUS BENCH_ARGS...
  local name=$1 limit=$2 gpus=$3
  shift 3
  if [ "$limit" -lt 60 ]; then say "serve $name skipped: ${limit}s left"; summary+=("serve_$name: skipped (no time)"); return; fi
  say "serve $name on GPUs $gpus (limit ${limit}s): $*"
  CUDA_VISIBLE_DEVICES=$gpus timeout -s INT -k 20 "$limit" $PY benchmarks/serve_overhead.py --device cuda \
    --model "$MODEL" --out "$OUT/serve_$name.json" --prompts "${PROMPTS:-64}" --max-tokens "${MAX_TOKENS:-128}" \
    --max-model-len 1024 --repeats "${REPEATS:-3}" --one-token --sync-repeats "${SYNC_REPEATS:-2}" "$@" 2>&1 \
    | tee -a "$LOG"
  summary+=("serve_$name: exit ${PIPESTATUS[0]}")
}

sync_run() {  # sync_run NAME MODEL_DIR LIMIT_S TP DP
  local name=$1 dir=$2 limit=$3 tp=$4 dp=$5
  if [ "$limit" -lt 90 ]; then say "sync $name skipped: ${limit}s left"; summary+=("sync_$name: skipped (no time)"); return; fi
  say "sync $name: tp=$tp dp=$dp (limit ${limit}s)"
  timeout -s INT -k 20 "$limit" $PY benchmarks/weight_sync.py --backend nccl --device cuda --models dir \
    --model-dir "$dir" --tp "$tp" --dp "$dp" --bucket-mb "${BUCKETS:-512,128}" --repeats "${REPEATS:-3}" \
    --per-tensor-limit "${PER_TENSOR_LIMIT:-20}" --out "$OUT/sync_$name.json" 2>&1 \
    | grep -v "Loading weights" | tee -a "$LOG"
  summary+=("sync_$name: exit ${PIPESTATUS[0]}")
}

sync_layouts() {  # sync_layouts PREFIX MODEL_DIR CAP_S RESERVE_S: tp2 then dp2 with 3+ GPUs, tp1 with 2
  local prefix=$1 dir=$2 cap=$3 reserve=$4
  if [ "$GPUS" -ge 3 ]; then
    # tp2 first; it leaves 100 s for dp2 only when there is room for both
    local hold=$reserve; [ $(( $(left) - reserve )) -ge 300 ] && hold=$(( reserve + 100 ))
    sync_run "${prefix}tp2" "$dir" "$(slot "$cap" "$hold")" 2 1
    sync_run "${prefix}dp2" "$dir" "$(slot "$cap" "$reserve")" 1 2
  elif [ "$GPUS" -ge 2 ]; then
    sync_run "${prefix}tp1" "$dir" "$(slot "$cap" "$reserve")" 1 1
  else
    say "sync needs 2 GPUs (trainer + server), found $GPUS"; summary+=("sync: not run ($GPUS GPU)")
  fi
}

case "$phase" in
  serve)
    build qwen2.5-1.5b "$MODEL" 120 || exit 1
    if [ "$GPUS" -ge 2 ]; then
      serve_run tp1 "$(slot 200 300)" 0 --data-parallel-size 1
      serve_run tp2 "$(slot 230 120)" 0,1 --data-parallel-size 1 --tensor-parallel-size 2
      serve_run dp2 "$(slot 600 30)" 0,1 --data-parallel-size 2 --skip-inproc
    else
      serve_run tp1 "$(slot 600 30)" 0 --data-parallel-size 1
    fi
    ;;
  sync)
    build qwen2.5-1.5b "$MODEL" 120 || exit 1
    # The 1.5B runs come first (at most 200 s each); the 7B (build + one sync) needs ~230 s of what is left.
    sync_layouts "" "$MODEL" 200 30
    if [ "$(left)" -ge 230 ]; then
      build qwen2.5-7b "$MODEL7B" "$(slot 180 110)" && sync_layouts 7b_ "$MODEL7B" 260 30
    else
      say "7b skipped: $(left)s left (run_multi.sh sync7b in another call)"; summary+=("7b: skipped (no time)")
    fi
    ;;
  sync7b)
    build qwen2.5-7b "$MODEL7B" 240 || exit 1
    sync_layouts 7b_ "$MODEL7B" 260 30
    ;;
  *)
    echo "usage: run_multi.sh serve|sync|sync7b" >&2; exit 2
    ;;
esac

{
  echo "== summary, phase $phase, $GPUS GPU(s), ${SECONDS}s"
  for line in "${summary[@]}"; do echo "  $line"; done
  $PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path

for f in sorted(Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(f.read_text())
    except Exception as exc:  # noqa: BLE001
        print(f"  {f.name}: unreadable ({exc})")
        continue
    if f.name.startswith("serve_"):
        modes, cfg = r.get("modes", {}), r.get("config", {})
        tps = {k: round(m["tokens_per_s"], 1) for k, m in modes.items()}
        sync = next((m["sync"] for m in modes.values() if "sync" in m), {})
        print(f"  {f.stem}: TP={cfg.get('tensor_parallel_size')} DP={cfg.get('dp_list')} tokens/s {tps}, "
              f"gloo sync {sync.get('median_s')} s ({sync.get('gb_per_s')} GB/s), "
              f"server overhead {r.get('server_overhead_pct')}%, fixed cost {r.get('server_fixed_cost_ms')} ms")
    elif f.name.startswith("sync_"):
        for name, m in r.get("models", {}).items():
            print(f"  {f.stem} ({name}, TP={r['config']['tp']} DP={r['config']['dp']}): {m['bytes'] / 1e9:.2f} GB, "
                  f"bucketed {m['bucketed_s']:.3f} s, per-tensor {m['per_tensor_s']:.3f} s, floor {m['floor_s']:.3f} s "
                  f"({m['gb_per_s']['floor']:.1f} GB/s), bucketed/floor {m['bucketed_over_floor']:.2f}, "
                  f"outputs match {m['bucketed_output_matches']}/{m['restored_output_matches']}")
PY
} 2>&1 | tee -a "$LOG"
