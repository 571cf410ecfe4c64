"""Images in training and generation: a vision-language model's processor and the forward's image inputs.

A prompt goes to a generator as ``PromptInput(token_ids, images)`` with ONE image placeholder
token per image; the engine expands each placeholder to the image's token count and returns
the expanded ids it ran. The trainer computes ``pixel_values`` and ``image_grid_thw`` with the
model's own image processor and expands the placeholders itself (what the processor does to a
prompt): both expansions must agree token for token, or the trainer would compute logprobs over
other tokens than the ones the completions were sampled after (:class:`ImageCodec.check`).

Supported: the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL), whose processor expands an image into
``grid_t * grid_h * grid_w / merge_size**2`` tokens and whose forward derives its multimodal
rotary positions from ``image_grid_thw`` (and, in transformers 5, ``mm_token_type_ids``). On a
CPU machine without torchvision, transformers' ``AutoProcessor`` picks the PIL image processor
(``Qwen2VLImageProcessorPil``); with torchvision, the fast one (same outputs, up to resize rounding).
Loading and freezing a vision-language policy is the trainer's (``vroll.trainer.model.vision``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from vroll.models import is_vision_config

VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")  # transformers' names across families


def is_vision_model(model: Any) -> bool:
    return is_vision_config(getattr(model, "config", None))


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's vision encoder (through PEFT and task wrappers), or None."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_TOWER_NAMES:
            return module
    return None


@dataclass(frozen=True)
class PromptImages:
    """One prompt's images as the model's forward takes them."""

    pixel_values: torch.Tensor  # (patches, channels * temporal_patch * patch * patch)
    image_grid_thw: torch.Tensor  # (images, 3): temporal, height and width patches of each image


@dataclass
class VisionBatch:
    """The image inputs of B rows (a completion's row repeats its prompt's images).

    With the vision tower frozen, each prompt's image features are computed once (without
    gradients) and reused by every row, micro-batch and model pass (policy, old, reference) that
    shares this batch's ``features``; the model then gets them as ``mm_encoder_outputs`` instead of
    running its vision tower on ``pixel_values`` once per completion. Where the installed
    transformers has no ``mm_encoder_outputs``, or the tower trains, ``pixel_values`` go as usual.
    """

    images: list[PromptImages | None]  # per row; None: a text-only row
    image_token_id: int
    # (id(prompt images), id(vision tower), autocast dtype) -> that prompt's image features, one per image
    features: dict[tuple, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False,
                                                            metadata={"checkpoint": False})  # ids: this process's

    def select(self, rows: slice | list[int]) -> VisionBatch:
        images = self.images[rows] if isinstance(rows, slice) else [self.images[i] for i in rows]
        return VisionBatch(images, self.image_token_id, self.features)  # the cache is shared

    def to(self, device: torch.device) -> VisionBatch:
        moved: dict[int, PromptImages] = {}  # rows of one prompt share one copy
        images = [None if im is None else moved.setdefault(id(im), PromptImages(
            *(getattr(im, f.name).to(device) for f in fields(im)))) for im in self.images]
        return VisionBatch(images, self.image_token_id)

    def forward_kwargs(self, model: torch.nn.Module, input_ids: torch.Tensor,
                       reuse_features: bool = True) -> dict[str, Any]:
        """``pixel_values`` (or cached features), ``image_grid_thw``, and ``mm_token_type_ids`` where taken.

        ``reuse_features=False``: always ``pixel_values`` (``generate()``, which expands its inputs itself).
        """
        present = [im for im in self.images if im is not None]
        if not present:
            return {}
        out: dict[str, Any] = {"image_grid_thw": torch.cat([im.image_grid_thw for im in present])}
        base = _unwrap(model)
        tower = vision_tower(base)
        if reuse_features and tower is not None and _takes(base, "mm_encoder_outputs") and not any(
                p.requires_grad for p in tower.parameters()):
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            feats = [f for im in present for f in self._features(base, tower, im)]
            out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}
        else:
            out["pixel_values"] = torch.cat([im.pixel_values for im in present])
        if _takes(base, "mm_token_type_ids"):  # transformers 5: without it, text-only positions
            out["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        return out

    def _features(self, model: torch.nn.Module, tower: torch.nn.Module, im: PromptImages) -> tuple[torch.Tensor, ...]:
        device = im.pixel_values.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        key = (id(im), id(tower), dtype)
        if key not in self.features:
            with torch.no_grad():
                out = model.get_image_features(pixel_values=im.pixel_values, image_grid_thw=im.image_grid_thw)
            feats = out.pooler_output if hasattr(out, "pooler_output") else out
            self.features[key] = tuple(feats) if isinstance(feats, list | tuple) else (feats,)
        return self.features[key]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP and PEFT wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "get_base_model", lambda: model)()


def _takes(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's own forward (under DDP and PEFT wrappers) has a parameter ``name``."""
    return name in inspect.signature(_unwrap(model).forward).parameters


class ImageCodec:
    """The model's image processor and its placeholder arithmetic (the Qwen2-VL family).

    Built from the image processor alone (:meth:`for_model`), not from ``AutoProcessor``: in
    transformers 5.19 a Qwen2-VL processor object cannot be built without torchvision (its video
    processor needs it), while the image processor has a PIL twin.
    """

    def __init__(self, image_processor: Any, image_token_id: int) -> None:
        self.image_processor = image_processor
        self.image_token_id = int(image_token_id)
        self.merge = getattr(image_processor, "merge_size", None)
        if self.merge is None:
            raise ValueError(f"images need a Qwen2-VL-family image processor (one with merge_size); got "
                             f"{type(image_processor).__name__}")

    @classmethod
    def from_processor(cls, processor: Any) -> ImageCodec:
        """From a full processor (``AutoProcessor``, where it can be built)."""
        return cls(processor.image_processor, processor.image_token_id)

    @classmethod
    def for_model(cls, model: Any) -> ImageCodec | None:
        """The codec of a vision-language model (loaded from its folder or Hub id); None for a text model."""
        config = getattr(model, "config", None)
        if not is_vision_config(config):
            return None
        from transformers import AutoImageProcessor

        source = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        token = getattr(config, "image_token_id", None)
        if not source or token is None:
            raise ValueError(f"{type(model).__name__}: cannot find its image processor (config names no folder) "
                             f"or its image token (config.image_token_id)")
        return cls(AutoImageProcessor.from_pretrained(source), token)

    def save_pretrained(self, path: str | Any) -> None:
        """``preprocessor_config.json``: what vLLM and transformers read to process images the same way."""
        self.image_processor.save_pretrained(path)

    def encode(self, images: Sequence[Any]) -> PromptImages:
        """``pixel_values`` and ``image_grid_thw`` of one prompt's images (in placeholder order)."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        return PromptImages(out["pixel_values"], out["image_grid_thw"].long())

    def tokens_per_image(self, images: PromptImages) -> list[int]:
        return (images.image_grid_thw.prod(-1) // self.merge**2).tolist()

    def expand(self, token_ids: Sequence[int], images: PromptImages) -> list[int]:
        """The prompt as the model runs it: each placeholder repeated to its image's token count."""
        counts = iter(self.tokens_per_image(images))
        out: list[int] = []
        for t in token_ids:
            out += [t] * next(counts) if t == self.image_token_id else [t]
        return out

    def check(self, index: int, sent: Sequence[int], images: PromptImages, ran: Sequence[int]) -> None:
        """Fail unless the generator ran (``ran``) exactly the tokens the processor's expansion of ``sent`` gives."""
        placeholders = sum(1 for t in sent if t == self.image_token_id)
        if placeholders != len(images.image_grid_thw):
            raise ValueError(f"completion {index}: {placeholders} image placeholder(s) for "
                             f"{len(images.image_grid_thw)} image(s)")
        expected = self.expand(sent, images)
        if list(ran) != expected:
            first = next((i for i, (a, b) in enumerate(zip(ran, expected, strict=False)) if a != b),
                         min(len(ran), len(expected)))
            raise ValueError(
                f"completion {index}: the generator ran {len(ran)} prompt tokens, but the trainer's processor expands "
                f"the prompt to {len(expected)} (image tokens per image: {self.tokens_per_image(images)}; first "
                f"difference at token {first}). The engine and the trainer process images differently (another "
                f"preprocessor_config.json, min/max_pixels?): the logprobs would not match the sampled completions")


def rollout_vision(codec: ImageCodec | None, rollout: Any, rows: Sequence[int]) -> VisionBatch | None:
    """The image inputs of a rollout's completions ``rows`` (None when none has images).

    Each distinct prompt's images are processed once (its n completions share them), and every
    row's prompt as the generator ran it (``rollout.prompt_ids``, placeholders expanded) is checked
    against the codec's expansion of the prompt as sent (``rollout.prompts``).
    """
    if not rollout.prompts or not any(rollout.prompts[i].images for i in rows):
        return None
    if codec is None:
        raise ValueError("the prompts have images, but the policy is a text-only model")
    encoded: dict[int, PromptImages] = {}
    out: list[PromptImages | None] = []
    for i in rows:
        prompt = rollout.prompts[i]
        if not prompt.images:
            out.append(None)
            continue
        images = encoded.get(id(prompt))
        if images is None:
            images = encoded[id(prompt)] = codec.encode(prompt.images)
        codec.check(i, prompt.token_ids, images, rollout.prompt_ids[i])
        out.append(images)
    return VisionBatch(out, codec.image_token_id)
