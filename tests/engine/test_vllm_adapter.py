"""The engine adapter's conversions that need no engine: vLLM's logprob containers, sampling params."""

import pytest

from vroll.engine.vllm_adapter import _build_sampling_params, _sampled_logprobs
from vroll.protocol import SamplingSpec

pytest.importorskip("vllm")
from vllm.logprobs import FlatLogprobs, Logprob  # noqa: E402


def _positions(token_ids, values, extra=None):
    """vLLM's per-position dicts: the sampled token, plus ``extra`` top-k entries where given."""
    out = []
    for i, (tok, lp) in enumerate(zip(token_ids, values, strict=True)):
        d = {tok: Logprob(logprob=lp, rank=1, decoded_token=None)}
        if extra:
            d[extra[i]] = Logprob(logprob=-9.0, rank=2, decoded_token=None)
        out.append(d)
    return out


def test_flat_and_dict_logprobs_read_the_same():
    ids, values = [5, 7, 5, 11], [-0.5, -1.25, -0.1, -3.0]
    dicts = _positions(ids, values)
    flat = FlatLogprobs()
    for d in dicts:
        flat.append(d)
    assert _sampled_logprobs(ids, dicts) == values
    assert _sampled_logprobs(ids, flat) == values
    assert _sampled_logprobs(ids, None) == []


def test_flat_logprobs_with_more_than_the_sampled_token_are_read_per_position():
    """Negative control for the fast path: with top-k entries the flat lists are not one per position."""
    ids, values = [5, 7], [-0.5, -1.25]
    flat = FlatLogprobs()
    for d in _positions(ids, values, extra=[6, 8]):
        flat.append(d)
    assert len(flat.logprobs) == 4
    assert _sampled_logprobs(ids, flat) == values


def test_sampling_params_ask_for_flat_logprobs_of_the_sampled_token_without_text():
    params = _build_sampling_params(SamplingSpec(n=2, max_tokens=8), prompt_index=0, delta=False)
    assert params.logprobs == 0 and params.flat_logprobs and not params.detokenize
    with_stop = _build_sampling_params(SamplingSpec(n=1, max_tokens=8, stop=("\n",)), 0, False)
    assert with_stop.detokenize  # stop strings need the text


def test_sampling_params_ask_for_no_logprobs_when_the_trainer_reads_none():
    params = _build_sampling_params(SamplingSpec(n=2, max_tokens=8, return_logprobs=False), 0, False)
    assert params.logprobs is None and not getattr(params, "flat_logprobs", False)
