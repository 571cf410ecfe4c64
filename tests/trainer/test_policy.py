"""The policy as the trainer loads it: in train mode, so --gradient_checkpointing recomputes the layers.

transformers' from_pretrained returns an eval-mode model, and its checkpointed layers check
``self.training``: a policy left in eval mode silently kept every layer's activations (a 1.5B model at
32K tokens a micro-batch ran an H100 out of memory at ~100 GiB). Checkpointing shows as a second
forward of each layer during backward, which is what these tests count.
"""

import pytest
import torch

from vroll.testing.text import build_text_model
from vroll.trainer.config import TrainConfig
from vroll.trainer.model.policy import load_policy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_text_model("tiny", tmp_path_factory.mktemp("tiny")))


def _layer_forwards(model, steps: int = 1) -> int:
    """Forwards of the first decoder layer during ``steps`` forward + backward passes (counted as they
    start: torch's checkpoint stops a recompute once it has the tensors backward needs)."""
    calls = []
    layer = model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for _ in range(steps):
            ids = torch.randint(0, 100, (2, 12))
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    finally:
        handle.remove()
    return len(calls)


def _config(model: str, **overrides) -> TrainConfig:
    return TrainConfig(model_name_or_path=model, torch_dtype="float32", **overrides)


def test_gradient_checkpointing_recomputes_the_layers(tiny):
    model, _ = load_policy(None, None, _config(tiny, gradient_checkpointing=True))
    assert model.training
    assert _layer_forwards(model) == 2  # forward, then the recompute in backward


def test_without_checkpointing_each_layer_runs_once(tiny):
    model, _ = load_policy(None, None, _config(tiny))
    assert _layer_forwards(model) == 1


def test_an_eval_mode_policy_does_not_checkpoint(tiny):
    """The negative control: the defect this file guards against, reproduced."""
    model, _ = load_policy(None, None, _config(tiny, gradient_checkpointing=True))
    model.eval()
    assert _layer_forwards(model) == 1


def test_disable_dropout_zeroes_every_dropout(tiny):
    model, _ = load_policy(None, None, _config(tiny))
    model.add_module("extra_dropout", torch.nn.Dropout(0.3))
    model, _ = load_policy(model, None, _config(tiny, disable_dropout=True))
    probabilities = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert probabilities == [0.0]
