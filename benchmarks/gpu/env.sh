# Sourced by the run_*.sh scripts, from the repository root: the staged vLLM bundle and this
# checkout's sources on the path, and where results go ($OUT comes back from a device call).
# The GPU machine has no embedded model: make_model.py takes the tokenizer from .tokenizer/
# (git-ignored), exported on your machine once and carried with the call:
#   python benchmarks/gpu/make_model.py --export-tokenizer .tokenizer
export PYTHONPATH=/tmp/site:$PWD/src VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
# NVLink multicast stays off on the lent machines (it can take a shared host's GPUs down; KINDS.md)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
OUT=${OUT:-$PWD/.device-out}
PY=${PY:-python3}
mkdir -p "$OUT"

# transformers 5.17 (the GPU image) builds a processor only where mistral_common imports (its tokenizer class
# check asks for MistralCommonBackend); the bundle lacks it: carry .gpu/mc (pip download mistral_common and its
# missing deps) and install it once with pip install --no-deps --no-index --target /tmp/mcsite .gpu/mc/*.whl
[ -d .gpu/mc ] && [ ! -d /tmp/mcsite ] && $PY -m pip install -q --no-deps --no-index --target /tmp/mcsite .gpu/mc/*.whl
[ -d /tmp/mcsite ] && export PYTHONPATH=$PYTHONPATH:/tmp/mcsite
true  # sourcing succeeds without .gpu/mc
