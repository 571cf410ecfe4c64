"""Prompts as an engine takes them: token ids (chat prompts through the chat template) and their images."""

from __future__ import annotations

from typing import Any

from vroll.protocol import PromptInput


def text_tokenizer(processing: Any) -> Any:
    """The tokenizer of a tokenizer or of a processor (a vision-language model's ``AutoProcessor``)."""
    from transformers import ProcessorMixin

    return processing.tokenizer if isinstance(processing, ProcessorMixin) else processing


def encode_prompts(tokenizer: Any, prompts: list[Any], max_length: int | None,
                   images: list[tuple[Any, ...]] | None = None, tools: list[dict] | None = None) -> list[PromptInput]:
    """Each prompt as token ids (chat prompts through the chat template), left-truncated, with its images.

    The chat template renders each ``{"type": "image"}`` part as ONE image placeholder token (the
    engine, or the trainer's :class:`~vroll.vision.ImageCodec`, expands it). A prompt with
    images is never truncated (that could cut an image away): over ``max_length``, it is an error.
    ``tools``: JSON schemas for the chat template to render (``--tools``).
    """
    out = []
    for i, p in enumerate(prompts):
        imgs = tuple(images[i]) if images else ()
        if isinstance(p, str):
            ids = tokenizer(p).input_ids
        else:
            schemas = {"tools": tools} if tools else {}  # only where asked: not every template API takes it
            text = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False, **schemas)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        if max_length and len(ids) > max_length:
            if imgs:
                raise ValueError(f"prompt {i} has {len(ids)} tokens (one per image), over max_prompt_length "
                                 f"{max_length}; a prompt with images is not truncated (that could cut an image "
                                 f"away): raise max_prompt_length")
            ids = ids[-max_length:]
        out.append(PromptInput(ids, imgs))
    return out
