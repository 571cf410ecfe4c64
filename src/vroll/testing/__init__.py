"""Random-weight models for tests and benchmarks, built offline in seconds (CPU) or on the GPU.

- :func:`build_text_model` (``vroll.testing.text``): the layer shapes of Qwen2.5-0.5B/1.5B/7B,
  Llama-3.2-1B, or a 2-layer ``"tiny"`` Qwen2 (``benchmarks/gpu/make_model.py`` is its command line);
- :func:`build_tiny_vlm` (``vroll.testing.vlm``): a Qwen2-VL / Qwen2.5-VL, 2 layers or 3B-shaped.

Both take the embedded model's tokenizer; nothing here is needed to train or serve.
"""

from vroll.testing.text import build_text_model
from vroll.testing.vlm import build_tiny_vlm

__all__ = ["build_text_model", "build_tiny_vlm"]
