# Sourced by the run_*.sh scripts, from the repository root: the staged vLLM bundle and this
# checkout's sources on the path, and where results go ($OUT comes back from a device call).
# The GPU machine has no embedded model: make_model.py takes the tokenizer from .tokenizer/
# (git-ignored), exported on your machine once and carried with the call:
#   python benchmarks/gpu/make_model.py --export-tokenizer .tokenizer
export PYTHONPATH=/tmp/site:$PWD/src VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/.device-out}
mkdir -p "$OUT"
PY=${PY:-python3}
