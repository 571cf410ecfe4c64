"""Random-weight text models with the layer shapes of real ones, built with no download.

The layer shapes of a real model (Qwen2.5-0.5B/1.5B/7B, Llama-3.2-1B), random bf16 weights, and
the embedded SmolLM2 tokenizer (49,152 tokens, so ``vocab_size`` differs from the real model's unless
``vocab_size`` sets it: 151,936 gives Qwen's lm_head, whose logits dominate training memory at long
completions; the ids past the tokenizer's decode to nothing, as Qwen's own padding ids do).
Weights do not change speed. ``"tiny"`` is no real model: a 2-layer Qwen2 whose attention heads
split in two, built in seconds for CPU checks. ``benchmarks/gpu/make_model.py`` is the command
line over :func:`build_text_model`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

VOCAB_SIZE = 49152  # the embedded SmolLM2 tokenizer
QWEN_VOCAB_SIZE = 151936  # Qwen2.5's lm_head (its tokenizer has 151,665 tokens)
BOS_ID, EOS_ID = 1, 2  # <|im_start|>, <|im_end|>
SHARD_SIZE = "4GB"  # only qwen2.5-7b needs more than one shard; bounds the host copy of a GPU build
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# Layer shapes of the real models (vocabulary aside).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True),
    # ~6.9B parameters with this vocabulary (untied lm_head): ~14 GB in bf16, built directly in bf16.
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, rope_theta=1_000_000.0,
                       rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False),
    "llama-1b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500_000.0,
                     rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True),
    # Not a real model: a 2-layer Qwen2 for checking the builder and the tests on a CPU.
    "tiny": dict(arch="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True),
}


def export_tokenizer(out: Path) -> Path:
    """Copy the embedded model's tokenizer files to ``out`` (run where the embedded model is)."""
    from vroll.models import embedded_model_path

    src = embedded_model_path()
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    return out


def text_config(shape: str, vocab_size: int = VOCAB_SIZE) -> Any:
    """The transformers config of ``shape``, with ``vocab_size`` lm_head rows (default: the tokenizer's) and its ids."""
    from transformers import LlamaConfig, Qwen2Config

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(sorted(SHAPES))}, got {shape!r}")
    if vocab_size < VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {VOCAB_SIZE}")
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    rope_theta = spec.pop("rope_theta")
    common = dict(vocab_size=vocab_size, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                  rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                  hidden_act="silu", initializer_range=0.02, use_cache=True)
    if arch == "qwen2":
        cfg = Qwen2Config(**common, **spec, use_sliding_window=False)
        cfg.architectures = ["Qwen2ForCausalLM"]
    else:
        cfg = LlamaConfig(**common, **spec, attention_bias=False, mlp_bias=False)
        cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def build_text_model(shape: str, out: Path, seed: int = 0, embed_std: float = 0.1,
                     tokenizer: Path | None = None, vocab_size: int = VOCAB_SIZE) -> Path:
    """Write the model folder (config, bf16 safetensors, tokenizer) to ``out``; returns it.

    ``tokenizer``: a folder holding the embedded tokenizer's files (the GPU machine has no embedded
    model: export them with :func:`export_tokenizer` and carry the folder); default: the embedded
    model's own. ``embed_std`` rescales the embeddings: transformers' 0.02 gives near-uniform
    next-token distributions (weak logprob and greedy checks), 0.1 peaked ones like a trained model's.
    ``vocab_size``: lm_head rows (``QWEN_VOCAB_SIZE`` for Qwen's), at least the tokenizer's.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from vroll.models import embedded_model_path

    tok_dir = tokenizer or embedded_model_path()
    config = text_config(shape, vocab_size)
    torch.manual_seed(seed)
    # Initializing on the GPU, where there is one, takes ~1 s instead of ~30 s for 0.5B
    # (the random values then differ from a CPU build with the same seed).
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if embed_std > 0:
        with torch.no_grad():
            embs = {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
            for emb in embs.values():  # one tensor when tied
                emb.mul_(embed_std / emb.float().std())
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = EOS_ID
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=SHARD_SIZE)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy2(tok_dir / name, out / name)
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    (out / "vroll_random_model.json").write_text(json.dumps(
        {"shape": shape, "seed": seed, "embed_std": embed_std, "parameters": params, "dtype": "bfloat16",
         "vocab_size": vocab_size, "note": "random weights from transformers' initialization; not a trained model"},
        indent=2))
    return out
