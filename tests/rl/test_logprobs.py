"""Log-probabilities in chunks of tokens (``vroll.rl.logprobs``) against today's full-logits path.

The reference is what the trainer computes today: the lm_head over every completion position, the
logits in fp32, ``selective_log_softmax`` (``vroll.trainer.logps.completion_logps``). Values and
gradients (w.r.t. the hidden states, the lm_head weight, and every parameter of a real model)
must agree in fp32 and under bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import vroll.rl.logprobs as logprobs_module
from helpers import make_tiny_model
from vroll.models import resolve_model
from vroll.rl.logprobs import chunked_logps, padded_request, scoring_forward, supports_scoring, to_rows
from vroll.rl.losses import selective_log_softmax
from vroll.trainer.logps import completion_logps, pad_batch


def _case(n: int = 40, h: int = 16, v: int = 300, seed: int = 0, weight_std: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    head = torch.nn.Linear(h, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight_std * torch.randn(v, h, generator=g))
    return hidden, head, torch.randint(0, v, (n,), generator=g), torch.randn(n, generator=g)


def _full(hidden, head, targets, temperature):
    """Today's path: all logits, fp32, ``selective_log_softmax``."""
    return selective_log_softmax((head(hidden).float() / temperature).unsqueeze(0), targets.unsqueeze(0))[0]


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_values_and_gradients_equal_the_full_logits(chunk, temperature):
    hidden, head, targets, weights = _case()
    ref = _full(hidden, head, targets, temperature)
    grads_ref = torch.autograd.grad((ref * weights).sum(), [hidden, head.weight])
    out, raw = chunked_logps(hidden, head, targets, temperature, with_raw=True, chunk_tokens=chunk)
    grads = torch.autograd.grad((out * weights).sum(), [hidden, head.weight])
    assert out.shape == (40,) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the raw logps are temperature 1 and carry no gradient (they only weight the importance ratio)
    assert not raw.requires_grad
    torch.testing.assert_close(raw, _full(hidden, head, targets, 1.0).detach(), rtol=0, atol=2e-5)
    # control: the weight as a bare tensor gives the same; a wrong temperature does not
    bare, _ = chunked_logps(hidden, head.weight, targets, temperature, chunk_tokens=chunk)
    torch.testing.assert_close(bare, out)
    other, _ = chunked_logps(hidden, head, targets, temperature * 1.5, chunk_tokens=chunk)
    assert (other - ref).abs().max() > 0.1


def _bf16_weight_grad_error() -> tuple[float, float]:
    """Relative error of the lm_head weight gradient under bf16 autocast, against fp32: the full path's,
    and ``chunked_logps``'s in 32 chunks."""
    # logits of std ~1, as a trained lm_head gives: the bf16 rounding of the sum then shows beside the matmul's
    hidden, head, targets, weights = _case(n=512, h=64, v=3000, seed=1, weight_std=0.125)
    (exact,) = torch.autograd.grad((_full(hidden, head, targets, 1.0) * weights).sum(), [head.weight])
    errors = []
    for fn in (_full, lambda *a: logprobs_module.chunked_logps(*a, chunk_tokens=16)[0]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(hidden, head, targets, 1.0)
        (grad,) = torch.autograd.grad((out * weights).sum(), [head.weight])
        errors.append(float((grad - exact).norm() / exact.norm()))
    return errors[0], errors[1]


def test_bf16_weight_gradient_is_as_precise_as_the_unchunked_matmul(monkeypatch):
    """Each chunk's bf16 weight gradient is rounded once and summed in fp32."""
    full, chunked = _bf16_weight_grad_error()
    assert chunked <= 1.1 * full, (chunked, full)
    # control: the 32 chunk gradients summed in bf16
    monkeypatch.setattr(logprobs_module, "_GRAD_SUM_DTYPE", torch.bfloat16)
    _, summed_in_bf16 = _bf16_weight_grad_error()
    assert summed_in_bf16 > 1.3 * full, (summed_in_bf16, full)


def test_bad_arguments_are_named():
    hidden, head, targets, _ = _case()
    with pytest.raises(ValueError, match="targets"):
        chunked_logps(hidden, head, targets[:-1])
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_logps(hidden, head, targets, chunk_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        chunked_logps(hidden, head, targets, 0.0)
    empty, raw = chunked_logps(hidden[:0], head, targets[:0], with_raw=True)
    assert empty.shape == raw.shape == (0,)
    empty.sum().backward()  # no token: a zero gradient, and the collectives of a backward all the same
    assert float(head.weight.grad.abs().sum()) == 0.0


# ---------------------------------------------------------------- through a real model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The embedded SmolLM2 (Llama, 49,152-token vocabulary) and a tiny random Qwen2, in fp32."""
    paths = {"smollm2": resolve_model(None), "tiny-qwen2": make_tiny_model(tmp_path_factory.mktemp("tiny"))}
    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for name, path in paths.items()}


@pytest.fixture
def model(models):
    return models["tiny-qwen2"]


def _batch():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    comps = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (6, 1, 11, 4)]
    return pad_batch(prompts, comps, pad_id=2)


def _grads(model, fn):
    """fn() -> (B, C) logps; their masked sum's gradient w.r.t. every parameter."""
    model.zero_grad()
    out, raw = fn()
    (out * _batch().completion_mask).sum().backward()
    return out.detach(), raw, {n: p.grad.clone() for n, p in model.named_parameters()}


def _scored(model, batch, temperature, autocast, shift=0):
    request, real = padded_request(batch.input_ids, batch.attention_mask, batch.completion_ids, temperature,
                                   with_raw=True, chunk_tokens=5)
    request.positions = request.positions + shift
    with scoring_forward(model), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logps, raw = model(**batch.forward_kwargs(model), score=request)
    return to_rows(logps, real), to_rows(raw, real)


# SmolLM2 once (135M parameters: bf16 matmuls on a CPU take minutes); the tiny Qwen2 in every mode
@pytest.mark.parametrize(("name", "temperature", "autocast"), [
    ("smollm2", 0.7, False), ("tiny-qwen2", 1.0, False), ("tiny-qwen2", 0.7, False), ("tiny-qwen2", 1.0, True),
    ("tiny-qwen2", 0.7, True)])
def test_scoring_forward_equals_completion_logps(models, name, temperature, autocast):
    model, batch, mask = models[name], _batch(), _batch().completion_mask

    def today():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return completion_logps(model, batch, temperature, with_raw=True)

    ref, raw_ref, grads_ref = _grads(model, today)
    out, raw, grads = _grads(model, lambda: _scored(model, batch, temperature, autocast))
    atol = 2e-2 if autocast else 1e-4  # bf16: the same per-token numbers, the weight gradient summed per chunk
    torch.testing.assert_close(out * mask, ref * mask, rtol=0, atol=atol)
    torch.testing.assert_close(raw * mask, raw_ref * mask, rtol=0, atol=atol)
    worst = max(float((grads[n] - g).norm() / g.norm()) for n, g in grads_ref.items() if g.norm() > 0)
    assert worst < (5e-3 if autocast else 1e-3), worst
    # control: scoring each token by its own position instead of the one before it
    wrong, _ = _scored(model, batch, temperature, autocast, shift=1)
    assert float(((wrong.detach() - ref) * mask).abs().max()) > 0.1


def test_scoring_forward_leaves_the_model_as_it_was(model):
    batch = _batch()
    kwargs = batch.forward_kwargs(model)
    before = model(**kwargs).logits
    assert "forward" not in model.__dict__
    with scoring_forward(model):
        assert torch.equal(model(**kwargs).logits, before)  # without ``score``: the usual forward
    assert "forward" not in model.__dict__
    sentinel = model.forward  # an instance forward (accelerate's autocast wrapper sets one) is put back
    model.forward = sentinel
    try:
        with scoring_forward(model):
            assert model.forward is not sentinel
        assert model.__dict__["forward"] is sentinel
    finally:
        del model.forward


def test_models_with_transformed_logits_keep_the_full_path(model):
    assert supports_scoring(model)
    model.config.final_logit_softcapping = 30.0
    try:
        assert not supports_scoring(model)  # Gemma-2 style: the bare lm_head would be wrong
    finally:
        model.config.final_logit_softcapping = None
