"""Which weight-load path a worker takes: the model's own ``load_weights`` only where nothing
is processed after loading (CUDA, unquantized linear/embedding layers); vLLM's layerwise
reload everywhere else (CPU repacks, quantized and MoE layers re-layout). The CUDA path
itself is checked against the trainer on the GPU machine (tests/gpu)."""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from vroll.engine.worker_extension import loads_in_place


class Layer(torch.nn.Module):
    def __init__(self, method: object | None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 2))
        if method is not None:
            self.quant_method = method


class OtherMethod:  # a quantized / MoE layer's method: its weights are re-laid-out after loading
    pass


def model(*methods: object | None) -> torch.nn.Module:
    return torch.nn.Sequential(*(Layer(m) for m in methods))


UNQUANTIZED = (UnquantizedEmbeddingMethod(), UnquantizedLinearMethod(), None, UnquantizedLinearMethod())


def test_unquantized_model_on_cuda_loads_in_place():
    assert loads_in_place(model(*UNQUANTIZED), None, cuda=True)


@pytest.mark.parametrize(("layers", "quantization", "cuda"), [
    (UNQUANTIZED, None, False),  # CPU: the GEMM weights are repacked after loading
    (UNQUANTIZED, "fp8", True),  # a quantized checkpoint
    ((*UNQUANTIZED, OtherMethod()), None, True),  # one layer with its own processing
])
def test_anything_else_takes_the_layerwise_reload(layers, quantization, cuda):
    assert not loads_in_place(model(*layers), quantization, cuda)
