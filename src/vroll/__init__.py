"""vroll: online RL for LLMs (GRPO, Online DPO) with a fast vLLM generation server.

Heavy pieces are imported on first use, so ``import vroll`` stays cheap and the
trainer side never imports vLLM.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GenerationClient": "vroll.client",
    "GRPOConfig": "vroll.trainer.config",
    "GRPOTrainer": "vroll.trainer.grpo",
    "OnlineDPOConfig": "vroll.trainer.config",
    "OnlineDPOTrainer": "vroll.trainer.online_dpo",
    "ServeConfig": "vroll.server.config",
    "WeightSender": "vroll.weightsync.sender",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vroll' has no attribute {name!r}")
