"""The policy and its tokenizer, as the trainer loads them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vroll.generation.prompts import text_tokenizer
from vroll.models import resolve_model
from vroll.trainer.model.vision import policy_class, prepare_vision_model

if TYPE_CHECKING:
    from vroll.trainer.config import TrainConfig


def load_policy(model: Any, tokenizer: Any, args: TrainConfig, path: str | None = None) -> tuple[Any, Any]:
    """The trainable model and its tokenizer (``path`` overrides, e.g. a checkpoint).

    ``model``: a model object, a name, or None (``--model_name_or_path``); a vision-language model is
    loaded with its auto class and its vision tower frozen unless ``--freeze_vision_tower false``.
    ``tokenizer``: a tokenizer, or a VLM's processor (its tokenizer is taken), or None (the model's).
    """
    from transformers import AutoTokenizer

    name = path or (model if isinstance(model, str) else None) or args.model_name_or_path
    source = resolve_model(name)
    if model is None or isinstance(model, str) or path:
        dtype = "auto" if args.torch_dtype == "auto" else getattr(torch, args.torch_dtype)
        kwargs = {"attn_implementation": args.attn_backend()} if args.attn_implementation else {}
        model = policy_class(source).from_pretrained(source, dtype=dtype, **kwargs)  # a VLM's class for a VLM
    model = prepare_vision_model(model, args.freeze_vision_tower)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(source if isinstance(source, str) else model.name_or_path)
    tokenizer = text_tokenizer(tokenizer)  # a VLM's processor may be passed as processing_class
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tokenizer
