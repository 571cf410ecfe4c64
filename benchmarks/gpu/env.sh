# Sourced by the run_*.sh scripts, from the repository root: the staged vLLM bundle and this
# checkout's sources on the path, and where results go ($OUT comes back from a device call).
export PYTHONPATH=/tmp/site:$PWD/src VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/.device-out}
mkdir -p "$OUT"
PY=${PY:-python3}
