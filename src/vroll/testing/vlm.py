"""Random-weight Qwen2-VL / Qwen2.5-VL folders that transformers and vLLM load offline (tests, benchmarks).

``build_tiny_vlm(folder)`` writes a 2-layer model for CPU tests; ``shape="3b"`` Qwen2.5-VL-3B-Instruct's
layer shapes for GPU benchmarks. The tokenizer is the embedded model's with Qwen's vision tokens added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vroll.models import embedded_model_path

VLM_FAMILIES = ("qwen2_5_vl", "qwen2_vl")
VLM_SHAPES = ("tiny", "3b")
# Qwen's vision special tokens, added to the embedded tokenizer in this order (ids 49152..49155).
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_BOS_ID, _EOS_ID = 1, 2  # the embedded tokenizer's <|im_start|>, <|im_end|>
# Qwen2-VL-Instruct's chat template: an image part ({"type": "image"}, or any part holding an
# "image"/"image_url" key) becomes <|vision_start|><|image_pad|><|vision_end|>; the processor
# (or vLLM) then expands the one <|image_pad|> to the image's patch count.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Image pixels: the published processors allow 56x56 .. 28*28*1280 pixels (12.8M); the tiny
# model caps an image at 224x224 (64 tokens after the 2x2 merge) so CPU tests stay fast.
_PIXELS = {"tiny": (56 * 56, 224 * 224), "3b": (56 * 56, 28 * 28 * 1280)}
_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as in Qwen's preprocessor_config.json
_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Text decoders. "3b" is Qwen2.5-VL-3B-Instruct's published config (vocabulary aside); Qwen2-VL
# has no 3B, so the same numbers serve both families. "tiny": head_dim 64 (vLLM's CPU attention
# supports it) and mrope sections summing to head_dim / 2.
_TEXT = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
                 mrope_section=[8, 12, 12]),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
               mrope_section=[16, 24, 24]),
}
# Vision towers per family. 2.5: SwiGLU blocks, RMSNorm, window attention with full attention in
# the listed blocks. 2: GELU blocks of width embed_dim * mlp_ratio, full attention everywhere.
_VISION = {
    ("qwen2_5_vl", "tiny"): dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                                 window_size=112, fullatt_block_indexes=[1], tokens_per_second=2),
    ("qwen2_5_vl", "3b"): dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                               out_hidden_size=2048, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                               tokens_per_second=2),
    ("qwen2_vl", "tiny"): dict(depth=2, embed_dim=64, mlp_ratio=2, num_heads=2, hidden_size=128),
    ("qwen2_vl", "3b"): dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=2048),
}


def vlm_tokenizer(source: str | Path | None = None):  # -> transformers tokenizer
    """The embedded tokenizer (or the one in ``source``) with Qwen's vision special tokens added."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source or embedded_model_path()))
    missing = [t for t in VISION_TOKENS if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tok


def vlm_config(family: str, shape: str, tokenizer: Any):  # -> transformers PreTrainedConfig
    """The transformers config of a Qwen2-VL / Qwen2.5-VL of ``shape``, with ``tokenizer``'s ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if family not in VLM_FAMILIES or shape not in VLM_SHAPES:
        raise ValueError(f"family must be one of {VLM_FAMILIES} and shape one of {VLM_SHAPES}, "
                         f"got {family!r} / {shape!r}")
    text = dict(_TEXT[shape])
    mrope = text.pop("mrope_section")
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)), strict=True))
    text.update(vocab_size=len(tokenizer), bos_token_id=_BOS_ID, eos_token_id=_EOS_ID, pad_token_id=_EOS_ID,
                hidden_act="silu", use_sliding_window=False, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope})
    vision = dict(_VISION[family, shape], patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cls = Qwen2_5_VLConfig if family == "qwen2_5_vl" else Qwen2VLConfig
    config = cls(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration" if family == "qwen2_5_vl"
                            else "Qwen2VLForConditionalGeneration"]
    return config


def build_tiny_vlm(out_dir: str | Path, family: str = "qwen2_5_vl", shape: str = "tiny", seed: int = 0,
                   tokenizer: str | Path | None = None, embed_std: float = 0.1) -> Path:
    """Write a random-weight Qwen2-VL / Qwen2.5-VL folder that transformers and vLLM load offline.

    config.json, bf16 safetensors, the embedded tokenizer plus the vision special tokens, the
    Qwen2-VL chat template and ``preprocessor_config.json`` (Qwen2VLImageProcessor settings; where
    torchvision is missing transformers uses its PIL twin, ``Qwen2VLImageProcessorPil``).
    ``shape="tiny"``: 2 text and 2 vision layers, images capped at 224x224 (a 56x56 image is 4
    tokens, 112x112 is 16): for CPU tests. ``shape="3b"``: Qwen2.5-VL-3B-Instruct's published
    layer shapes (3.1B parameters with this 49k vocabulary, built in bf16, on the GPU where there
    is one): for GPU benchmarks. ``tokenizer``: a folder holding the embedded tokenizer (where
    the embedded model is not, e.g. the GPU machine's ``.tokenizer``). ``embed_std`` rescales
    the tied embedding: transformers' 0.02 gives near-uniform next-token distributions, where
    the image barely moves the logprobs.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    out = Path(out_dir)
    tok = vlm_tokenizer(tokenizer)
    config = vlm_config(family, shape, tok)
    torch.manual_seed(seed)
    device = "cuda" if shape != "tiny" and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    if embed_std > 0:
        _rescale_embeddings(model, embed_std)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = _BOS_ID, _EOS_ID, _EOS_ID
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    tok.save_pretrained(out)
    _write_processor_files(out, family, shape)
    if device == "cuda":  # the 3B shape: hand its 7.5 GB back, or a trainer started next in this process OOMs
        del model
        torch.cuda.empty_cache()
    return out


def _rescale_embeddings(model: Any, std: float) -> None:
    """Peaked outputs from random weights: the image then moves the logprobs measurably."""
    import torch

    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(std / emb.float().std())


def _write_processor_files(out: Path, family: str, shape: str) -> None:
    """``preprocessor_config.json`` and the chat template, as Qwen's published folders have them.

    Written by hand: transformers 5.19 cannot build a Qwen2-VL processor object without
    torchvision (its video processor needs it), so ``save_pretrained`` of one is not possible here.
    """
    import json

    min_pixels, max_pixels = _PIXELS[shape]
    processor = "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen2VLProcessor"
    pre = {"min_pixels": min_pixels, "max_pixels": max_pixels,
           "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
           "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
           "image_mean": list(_IMAGE_MEAN), "image_std": list(_IMAGE_STD),
           "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "do_convert_rgb": True, "image_processor_type": "Qwen2VLImageProcessor",
           "processor_class": processor}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)
