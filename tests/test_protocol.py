"""The request, sampling and result types on their own (no engine): strict, bounded, one type end to end."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from vroll.generation.rollout import Rollout
from vroll.protocol import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    ChatRequest,
    Completion,
    GenerateRequest,
    GenerateResult,
    PromptResult,
    SamplingSpec,
)


def test_defaults_and_trl_flat_body_are_accepted():
    req = GenerateRequest.model_validate_json(json.dumps(
        {"prompts": ["hi"], "n": 2, "temperature": 0.9, "top_p": 0.95, "top_k": -1, "min_p": 0.0,
         "repetition_penalty": 1.0, "max_tokens": 8, "stop": None, "seed": 3}))
    assert req.sampling() == SamplingSpec(n=2, temperature=0.9, top_p=0.95, max_tokens=8, seed=3)
    assert type(req.sampling()) is SamplingSpec
    assert SamplingSpec(temperature=1, stop=["x"]).stop == ("x",)  # an int temperature is a float


BAD = [
    ({"n": "3"}, "n"), ({"n": True}, "n"), ({"n": 1.0}, "n"), ({"n": 1025}, "n"), ({"n": 0}, "n"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"max_tokens": 2**70}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 1e308}, "temperature"), ({"temperature": -0.5}, "temperature"),
    ({"top_p": float("nan")}, "top_p"), ({"top_p": 0.0}, "top_p"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"repetition_penalty": 1e308}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k"),
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": "1"}, "seed"),
    ({"stop": [""]}, "stop string 0 is empty"), ({"stop": "x"}, "stop"), ({"stop": [1]}, "stop"),
    ({"temperature": 0.0, "n": 2}, "identical greedy"), ({"bogus": 1}, "bogus"),
]


@pytest.mark.parametrize(("fields", "reason"), BAD)
def test_sampling_is_strict_and_bounded(fields, reason):
    with pytest.raises(ValidationError, match=reason):
        SamplingSpec.model_validate(fields)
    with pytest.raises(ValidationError, match=reason):  # the HTTP body: same type, same rules
        GenerateRequest.model_validate({"prompts": ["hi"], **fields})


def test_json_infinity_and_nan_literals_are_refused():
    for literal in ("Infinity", "-Infinity", "NaN"):
        with pytest.raises(ValidationError, match="temperature"):
            GenerateRequest.model_validate(json.loads(f'{{"prompts": ["hi"], "temperature": {literal}}}'))


def test_the_spec_is_frozen():
    with pytest.raises(ValidationError):
        SamplingSpec().n = 2  # type: ignore[misc]


def test_seed_plus_prompt_count_must_stay_in_int64():
    spec = SamplingSpec(seed=2**63 - 1)
    assert spec.seed_overflow(1) is None  # the largest seed the field takes serves one prompt (it uses seed + 0)
    assert "2**63" in spec.seed_overflow(2)
    assert SamplingSpec(seed=2**63 - 8, n=2).seed_overflow(4) is None  # seeds up to 2**63 - 1
    assert SamplingSpec(seed=2**63 - 7, n=2).seed_overflow(4)
    assert SamplingSpec().seed_overflow(10**6) is None


def test_stop_strings_are_bounded_in_count_and_length():
    assert len(SamplingSpec(stop=["x"] * MAX_STOP_STRINGS).stop) == MAX_STOP_STRINGS
    with pytest.raises(ValidationError, match=f"{MAX_STOP_STRINGS + 1} stop strings; at most {MAX_STOP_STRINGS}"):
        GenerateRequest.model_validate({"prompts": ["hi"], "stop": ["x"] * (MAX_STOP_STRINGS + 1)})
    assert SamplingSpec(stop=["y" * MAX_STOP_CHARS]).stop
    with pytest.raises(ValidationError, match=f"stop string 1 has {MAX_STOP_CHARS + 1} characters"):
        SamplingSpec(stop=["a", "y" * (MAX_STOP_CHARS + 1)])


def test_lone_surrogates_are_refused_naming_the_prompt():
    with pytest.raises(ValidationError, match="prompt 1 is not valid Unicode"):
        GenerateRequest.model_validate(json.loads('{"prompts": ["ok", "a\\ud800b"]}'))
    with pytest.raises(ValidationError, match="conversation 0 message 1"):
        ChatRequest.model_validate({"messages": [[{"role": "user", "content": "hi"},
                                                  {"role": "user", "content": "a\ud800"}]]})
    with pytest.raises(ValidationError, match="stop string 0"):
        SamplingSpec(stop=["\udfff"])


def _result(logprobs: list[float]) -> GenerateResult:
    return GenerateResult([PromptResult([1, 2], [Completion([3, 4], "ab", logprobs, "length")])], 7)


def test_result_round_trips_through_json():
    res = _result([-0.5, -1.25])
    assert GenerateResult.from_json(res.to_json()) == res
    assert res.flat() == res.results[0].completions


def test_nan_logprobs_are_valid_json_null_and_read_back_as_nan():
    body = _result([math.nan, -1.0]).to_json()
    parsed = json.loads(body, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert parsed["results"][0]["completions"][0]["logprobs"] == [None, -1.0]
    back = GenerateResult.from_json(body)
    assert math.isnan(back.results[0].completions[0].logprobs[0])


def test_the_trainer_refuses_nan_logprobs_with_a_clear_error():
    assert Rollout.from_results(_result([-0.5, -1.0]), 0.1).truncated == [True]
    with pytest.raises(ValueError, match="completion 0 has NaN logprobs"):
        Rollout.from_results(GenerateResult.from_json(_result([math.nan, -1.0]).to_json()), 0.1)


def test_the_client_turns_a_malformed_answer_into_a_server_error():
    import httpx

    from vroll.client import GenerationClient, ServerError

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"results": [{"prompt_token_ids": [1], "completions": "x"}],
                                         "weight_version": 0})
    client = GenerationClient("http://test", transport=httpx.MockTransport(handler))
    with pytest.raises(ServerError, match="unexpected answer from /generate: results.0.completions"):
        client.generate(["hi"], max_tokens=2)

    def nan_handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stop"] == ["\n"]  # the body: TRL's flat field names
        return httpx.Response(200, content=_result([math.nan, -1.0]).to_json())
    client = GenerationClient("http://test", transport=httpx.MockTransport(nan_handler))
    out = client.generate(["hi"], SamplingSpec(stop=["\n"]))
    assert math.isnan(out.flat()[0].logprobs[0]) and out.flat()[0].logprobs[1] == -1.0


@pytest.mark.parametrize("body", [
    {"host": "127.0.0.1", "port": 1234, "force": "yes"},
    {"host": "127.0.0.1", "port": "1234"},
    {"host": "127.0.0.1", "port": 1234, "timeout_s": "60"},
])
def test_weight_sync_bodies_are_strict_too(body):
    from vroll.protocol import WeightsInitRequest

    with pytest.raises(ValidationError):
        WeightsInitRequest.model_validate(body)
    assert WeightsInitRequest.model_validate({"host": "127.0.0.1", "port": 1234, "timeout_s": 60}).timeout_s == 60.0
