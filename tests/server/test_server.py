"""The generation server on the real vLLM engine: outputs, DP, logprobs, bad input, auth."""

from __future__ import annotations

import httpx
import pytest
import torch

from vroll.client import GenerationClient, ServerError, ServerUnavailable

pytestmark = pytest.mark.slow

PROMPTS = [f"What is {a} + {b}?" for a, b in [(12, 30), (45, 17), (88, 11), (23, 59), (64, 20)]]


def test_health_and_info(server_dp2):
    assert httpx.get(f"{server_dp2.url}/health").json()["status"] == "ok"
    info = server_dp2.client().info()
    assert (info.model, info.dtype, info.data_parallel_size, info.tensor_parallel_size) == \
        ("smollm2-135m", "bfloat16", 2, 1)
    assert info.max_model_len == 512 and info.device == "cpu" and info.vllm_version


def test_n_samples_per_prompt_in_input_order(server_dp2):
    out = server_dp2.client().generate(PROMPTS, n=3, temperature=1.0, max_tokens=8, seed=1)
    assert len(out.results) == len(PROMPTS)
    for prompt, result in zip(PROMPTS, out.results, strict=True):
        assert len(result.completions) == 3
        assert result.prompt_token_ids == server_tokenize(server_dp2, prompt)
        for c in result.completions:
            assert 1 <= len(c.token_ids) <= 8 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in {"stop", "length"} and all(lp <= 0 for lp in c.logprobs)


def server_tokenize(server, text: str) -> list[int]:
    from transformers import AutoTokenizer

    from vroll.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(None))(text).input_ids


def test_dp2_equals_dp1_for_seeded_and_greedy_requests(server_dp2, server_dp1_key):
    for kwargs in (dict(temperature=0.0, n=1), dict(temperature=1.0, seed=123, n=2)):
        two = server_dp2.client().generate(PROMPTS, max_tokens=12, **kwargs)
        one = server_dp1_key.client().generate(PROMPTS, max_tokens=12, **kwargs)
        assert [[c.token_ids for c in r.completions] for r in two.results] == \
            [[c.token_ids for c in r.completions] for r in one.results]


def test_logprobs_match_a_transformers_forward_pass(server_dp2, hf_model):
    out = server_dp2.client().generate(PROMPTS, n=2, temperature=1.0, max_tokens=16, seed=7)
    diffs = []
    for r in out.results:
        for c in r.completions:
            ids = torch.tensor([r.prompt_token_ids + c.token_ids])
            with torch.no_grad():
                logits = hf_model(ids).logits[0, len(r.prompt_token_ids) - 1 : -1].float()
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            diffs.append((ref - torch.tensor(c.logprobs)).abs())
    diffs = torch.cat(diffs)
    # bf16 serving vs a float32 reference: per-token error ~1e-2, never a different distribution
    assert diffs.mean() < 0.05 and diffs.max() < 0.5, (diffs.mean(), diffs.max())


def test_chat_renders_the_template(server_dp2):
    out = server_dp2.client().chat([[{"role": "user", "content": "What is 2 + 3?"}]],
                                   temperature=0.0, max_tokens=10)
    ids = out.results[0].prompt_token_ids
    assert ids[-3:] == server_tokenize(server_dp2, "<|im_start|>assistant\n")[-3:]
    assert out.results[0].completions[0].text.strip()


BAD_BODIES = [
    ({"prompts": [], "max_tokens": 4}, 422, "prompts"),
    ({"prompts": ["hi"], "max_tokens": 0}, 422, "max_tokens"),
    ({"prompts": ["hi"], "n": 0}, 422, "n:"),
    ({"prompts": ["hi"], "temperature": -0.5}, 422, "temperature"),
    ({"prompts": ["hi"], "temperature": 0, "n": 2}, 422, "identical greedy"),
    ({"prompts": ["hi"], "bogus": 1}, 422, "bogus"),
    ({"prompts": [""]}, 422, "prompt 0 is empty"),
    ({"prompts": [[1, 2, 10**9]]}, 400, "outside the vocabulary"),
    ({"prompts": ["hello " * 600]}, 400, "max_model_len"),
]


@pytest.mark.parametrize(("body", "status", "reason"), BAD_BODIES)
def test_bad_input_is_a_4xx_with_a_reason_and_the_server_keeps_serving(server_dp2, body, status, reason):
    resp = httpx.post(f"{server_dp2.url}/generate", json=body, timeout=60)
    assert resp.status_code == status and reason in resp.json()["error"], resp.text
    assert "\n" not in resp.json()["error"]
    assert server_dp2.client().generate(["ok?"], max_tokens=2).results


def test_malformed_json_is_400(server_dp2):
    resp = httpx.post(f"{server_dp2.url}/generate", content=b'{"prompts": ["hi"',
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]


def test_client_raises_4xx_at_once_with_the_reason(server_dp2):
    with pytest.raises(ServerError) as err:
        server_dp2.client().generate(["hello " * 600])
    assert err.value.status == 400 and "max_model_len" in err.value.reason


def test_api_key_is_required_except_for_health(server_dp1_key):
    url = server_dp1_key.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/info").status_code == 401
    assert httpx.post(f"{url}/generate", json={"prompts": ["x"]}).status_code == 401
    assert httpx.get(f"{url}/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert server_dp1_key.client().info().data_parallel_size == 1
    with pytest.raises(ServerError) as err:
        GenerationClient(url).info()
    assert err.value.status == 401


def test_client_timeouts(server_dp2):
    slow = server_dp2.client(timeout=0.05, retries=0)
    with pytest.raises(ServerUnavailable, match="timed out"):
        slow.generate(PROMPTS, max_tokens=200, ignore_eos=True)
    from helpers import free_port

    nobody = GenerationClient(f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(ServerUnavailable, match="vroll serve --model"):
        nobody.wait_until_ready(timeout=1.5, poll=0.2)
    with pytest.raises(ServerUnavailable, match="cannot reach"):
        nobody.info()
