"""Weight names between the trainer's model in memory and the served checkpoint.

transformers >= 5 renames some models' weights when it loads them and renames them back
when it saves: a Qwen2-VL / Qwen2.5-VL in memory has ``model.language_model.*`` and
``model.visual.*``, its checkpoint (and so the served folder) ``model.*`` and ``visual.*``.
The server checks a sync's names against the served checkpoint, and vLLM's loaders take the
checkpoint names, so a sync sends those: :func:`saved_names` gives them, from transformers'
own reverse renaming (the one ``save_pretrained`` applies).

:func:`is_vision_weight` picks the vision tower's weights, for a trainer that freezes the
vision tower and syncs the language model only (``ModelSource(..., include=...)``).
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

# Checkpoint prefixes of vision towers and their projectors (Qwen2-VL family, LLaVA-style models).
VISION_PREFIXES = ("visual.", "vision_tower.", "vision_model.", "multi_modal_projector.", "model.visual.",
                   "model.vision_tower.", "model.multi_modal_projector.")


def saved_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` as ``save_pretrained`` writes it, where transformers renames it.

    Empty where nothing is renamed, for modules that are not transformers models, and for
    renamings that also transform the tensors (those keep their in-memory names).
    """
    config = getattr(model, "config", None)
    if config is None:
        return {}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: in-memory names are the checkpoint's
        return {}
    params = dict(model.named_parameters())
    try:
        saved = revert_weight_conversion(model, params)
    except Exception as exc:  # noqa: BLE001 - a converter that needs real tensors (ZeRO-3 shards)
        log.warning("weight sync keeps in-memory names: transformers' reverse renaming failed (%s)", exc)
        return {}
    return {id(t): name for name, t in saved.items() if isinstance(t, nn.Parameter)}


def is_vision_weight(name: str) -> bool:
    """A vision-tower (or projector) weight, by its checkpoint name."""
    return name.startswith(VISION_PREFIXES)
