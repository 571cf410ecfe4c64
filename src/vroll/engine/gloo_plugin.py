"""The ``vroll_gloo`` vLLM plugin: registers :mod:`vroll.engine.gloo_transfer`'s engine in each vLLM process.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers) through the
``vllm.general_plugins`` entry point ``vroll_gloo`` (pyproject.toml), for every server, whether or not it
uses the engine: so this module imports nothing of vLLM's up front, registers the engine by module path (imported only
by a server started with ``--weight-transfer-config '{"backend": "vroll_gloo"}'``), is idempotent, and on
a vLLM without pluggable weight-transfer engines logs one line instead of failing.

Where vroll's installed metadata predates the entry point, :func:`plugin_path` writes a tiny dist-info
declaring it and returns the folder to put on the server's ``PYTHONPATH`` (vLLM reads entry points from any
dist-info on ``sys.path``), as :mod:`vroll.engine.vision_plugin` does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vroll.weightsync.native import ENGINE_NAME

log = logging.getLogger(__name__)

_DIST = "vroll_gloo_transfer-0.dist-info"
_ENTRY_POINTS = f"[vllm.general_plugins]\n{ENGINE_NAME} = {__name__}:register\n"


def register() -> None:
    """Make ``--weight-transfer-config '{"backend": "vroll_gloo"}'`` resolve (no error if it already does)."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    except ImportError as exc:
        log.warning("%s: this vLLM has no pluggable weight-transfer engines (%s); not registered", ENGINE_NAME, exc)
        return
    if ENGINE_NAME in WeightTransferEngineFactory._registry:  # the factory's only view of what is registered
        return
    WeightTransferEngineFactory.register_engine(ENGINE_NAME, "vroll.engine.gloo_transfer", "GlooWeightTransferEngine")


def plugin_path(root: Path) -> Path:
    """Declare the entry point in ``root`` (a dist-info only, no code) and return ``root``: put it on the
    ``PYTHONPATH`` of ``vllm serve`` when vroll was installed before the entry point existed."""
    dist = root / _DIST
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vroll-gloo-transfer\nVersion: 0\n")
    tmp = dist / f".entry_points.{os.getpid()}"
    tmp.write_text(_ENTRY_POINTS)
    os.replace(tmp, dist / "entry_points.txt")  # servers starting together never read half a file
    return root
