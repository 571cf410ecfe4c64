"""A vision-language policy: the auto class that loads it, and its vision tower frozen.

The images themselves (processor, placeholder expansion, the forward's image inputs) are
``vroll.vision``'s, shared with generation.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vroll.models import is_vision_config
from vroll.vision import VISION_TOWER_NAMES, is_vision_model, vision_tower

log = logging.getLogger(__name__)


def policy_class(source: str) -> Any:
    """The transformers auto class that loads ``source``: image-text-to-text for a VLM, else causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_config(AutoConfig.from_pretrained(source)) else AutoModelForCausalLM


def prepare_vision_model(model: torch.nn.Module, freeze: bool) -> torch.nn.Module:
    """A vision-language policy with its vision tower frozen (``freeze``); a text model is returned as is."""
    if freeze and is_vision_model(model):
        n = freeze_vision_tower(model)
        log.info("vision tower frozen (%.1fM parameters)", n / 1e6)
    return model


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Stop gradients into the vision encoder (LoRA adapters inside it too); returns the parameters frozen."""
    tower = vision_tower(model)
    if tower is None:
        raise ValueError(f"freeze_vision_tower: {type(model).__name__} has no vision encoder "
                         f"(looked for a submodule named {', '.join(VISION_TOWER_NAMES)})")
    params = list(tower.parameters())
    for p in params:
        p.requires_grad_(False)
    return sum(p.numel() for p in params)
