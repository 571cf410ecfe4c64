"""The policy and its tokenizer, as the trainer loads them."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

import torch

from vroll.generation.prompts import text_tokenizer
from vroll.models import resolve_model
from vroll.rl.packing import register_varlen_attention
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
        attn = attention(args)
        kwargs = {"attn_implementation": attn} if attn else {}
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
    # from_pretrained returns a model in eval mode, where transformers skips gradient checkpointing (its layers
    # check self.training): without this the flag was a no-op and a 1.5B policy at 32K tokens a micro-batch kept
    # every layer's activations (an H100 out of memory at ~100 GiB)
    model.train()
    if args.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model, tokenizer


def attention(args: TrainConfig) -> str | None:
    """The attention implementation to load: ``--attn_implementation``; else, with ``--padding_free`` on a GPU
    whose torch has the flash varlen kernel, ``vroll_varlen`` (packed rows without an (S, S) mask, padded
    batches and ``generate`` through sdpa); else transformers' default (sdpa, which finds packed rows from
    their restarting positions with a mask)."""
    if args.attn_implementation:
        return args.attn_backend()
    if args.padding_free and torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen"):
        return register_varlen_attention()  # per process: every process loads the policy through here
    return None
