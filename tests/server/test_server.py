"""The generation server on the real vLLM engine: outputs, DP, logprobs, bad input, auth."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from helpers import served_logprob_gaps
from vroll.client import GenerationClient, ServerError, ServerUnavailable
from vroll.protocol import GenerateResult, SamplingSpec

pytestmark = pytest.mark.slow

# A refused request takes milliseconds on an idle machine; the bound leaves room for a loaded CI box,
# and still fails where the request used to hang or reach the engine.
REFUSED_WITHIN_S = 3.0

PROMPTS = [f"What is {a} + {b}?" for a, b in [(12, 30), (45, 17), (88, 11), (23, 59), (64, 20)]]


def test_health_and_info(server_dp2):
    assert httpx.get(f"{server_dp2.url}/health").json()["status"] == "ok"
    info = server_dp2.client().info()
    assert (info.model, info.dtype, info.data_parallel_size, info.tensor_parallel_size) == \
        ("smollm2-135m", "bfloat16", 2, 1)
    assert info.max_model_len == 512 and info.device == "cpu" and info.vllm_version


def test_n_samples_per_prompt_in_input_order(server_dp2):
    out = server_dp2.client().generate(PROMPTS, SamplingSpec(n=3, temperature=1.0, max_tokens=8, seed=1))
    assert isinstance(out, GenerateResult) and len(out.results) == len(PROMPTS)
    for prompt, result in zip(PROMPTS, out.results, strict=True):
        assert len(result.completions) == 3
        assert result.prompt_token_ids == server_tokenize(server_dp2, prompt)
        for c in result.completions:
            assert 1 <= len(c.token_ids) <= 8 and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason in {"stop", "length"} and all(lp <= 0 for lp in c.logprobs)


def test_texts_are_the_decoded_tokens(server_dp2):
    """vLLM does not detokenize per step (the adapter decodes each completion once); stop strings still cut."""
    from transformers import AutoTokenizer

    from vroll.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    out = server_dp2.client().generate(PROMPTS[:2], n=2, temperature=1.0, max_tokens=12, seed=3)
    for c in out.flat():
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    assert any(c.text.strip() for c in out.flat())
    cut = server_dp2.client().generate(PROMPTS[:2], n=2, temperature=1.0, max_tokens=24, seed=3, stop=[" "])
    assert all(" " not in c.text for c in cut.flat())


def test_without_logprobs_the_same_tokens_and_empty_logprobs(server_dp2):
    """``return_logprobs: false`` (a trainer that reads none) changes what comes back, not what is sampled."""
    kwargs = dict(n=2, temperature=1.0, max_tokens=12, seed=11)
    full = server_dp2.client().generate(PROMPTS[:2], **kwargs)
    bare = server_dp2.client().generate(PROMPTS[:2], return_logprobs=False, **kwargs)
    assert [c.token_ids for c in bare.flat()] == [c.token_ids for c in full.flat()]
    assert all(c.logprobs == [] for c in bare.flat()) and all(len(c.logprobs) == len(c.token_ids) for c in full.flat())


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
    diffs = served_logprob_gaps(hf_model, out)
    # bf16 serving vs a float32 reference: per-token error ~1e-2, never a different distribution
    assert diffs.mean() < 0.05 and diffs.max() < 0.5, (diffs.mean(), diffs.max())


def test_chat_renders_the_template(server_dp2):
    out = server_dp2.client().chat([[{"role": "user", "content": "What is 2 + 3?"}]],
                                   temperature=0.0, max_tokens=10)
    ids = out.results[0].prompt_token_ids
    assert ids[-3:] == server_tokenize(server_dp2, "<|im_start|>assistant\n")[-3:]
    assert out.results[0].completions[0].text.strip()


def test_keywords_build_the_same_spec(server_dp2):
    # Greedy: a seeded sample on the CPU backend can differ between two identical requests when the
    # scheduler batches them differently under load (GEMM numerics depend on the batch shape).
    spec = SamplingSpec(max_tokens=6, temperature=0.0, stop=["\n\n"])
    client = server_dp2.client()
    assert client.generate(PROMPTS[:2], spec) == client.generate(PROMPTS[:2], max_tokens=6, temperature=0.0,
                                                                  stop=["\n\n"])
    with pytest.raises(TypeError, match="not both"):
        client.generate(PROMPTS[:1], spec, n=2)


BAD_BODIES = [
    ({"prompts": [], "max_tokens": 4}, 422, "prompts"),
    ({"prompts": ["hi"], "n": "3"}, 422, "n: Input should be a valid integer"),
    ({"prompts": ["hi"], "n": True}, 422, "n: Input should be a valid integer"),
    ({"prompts": ["hi"], "n": 1025}, 422, "n:"),
    ({"prompts": ["hi"], "ignore_eos": "yes"}, 422, "ignore_eos"),
    ({"prompts": ["hi"], "max_tokens": 2**70}, 422, "max_tokens"),
    ({"prompts": ["hi"], "max_tokens": 513}, 400, "max_model_len 512"),
    ({"prompts": ["hi"], "temperature": 1e308}, 422, "temperature"),
    ({"prompts": ["hi"], "repetition_penalty": 1e308}, 422, "repetition_penalty"),
    ({"prompts": ["hi"], "stop": [""]}, 422, "stop string 0 is empty"),
    ({"prompts": ["hi"], "seed": 2**64}, 422, "seed"),
    ({"prompts": ["hi"], "seed": -1}, 422, "seed"),
    ({"prompts": ["hi", "there"], "seed": 2**63 - 1}, 400, "2**63"),
    ({"prompts": ["hi"], "max_tokens": 0}, 422, "max_tokens"),
    ({"prompts": ["hi"], "n": 0}, 422, "n:"),
    ({"prompts": ["hi"], "temperature": -0.5}, 422, "temperature"),
    ({"prompts": ["hi"], "temperature": 0, "n": 2}, 422, "identical greedy"),
    ({"prompts": ["hi"], "bogus": 1}, 422, "bogus"),
    ({"prompts": [""]}, 422, "prompt 0 is empty"),
    ({"prompts": [[1, 2, 10**9]]}, 400, "outside the vocabulary"),
    ({"prompts": ["hello " * 600]}, 400, "max_model_len"),
    # images for this text-only model (the multimodal cases: tests/server/test_multimodal.py)
    ({"prompts": ["hi"], "images": ["aGk="]}, 400, "takes no images"),
    ({"prompts": ["hi"], "images": [["aGk="]]}, 400, "takes no images"),
]


@pytest.mark.parametrize(("body", "status", "reason"), BAD_BODIES)
def test_bad_input_is_a_4xx_with_a_reason_and_the_server_keeps_serving(server_dp2, body, status, reason):
    start = time.monotonic()
    resp = httpx.post(f"{server_dp2.url}/generate", json=body, timeout=60)
    assert time.monotonic() - start < REFUSED_WITHIN_S
    assert resp.status_code == status and reason in resp.json()["error"], resp.text
    assert "\n" not in resp.json()["error"]
    assert server_dp2.client().generate(["ok?"], max_tokens=2).results


RAW_BODIES = [  # what json= cannot send: JSON's non-standard constants, a lone surrogate escape
    (b'{"prompts": ["hi"], "temperature": Infinity}', "temperature"),
    (b'{"prompts": ["hi"], "repetition_penalty": Infinity}', "repetition_penalty"),
    (b'{"prompts": ["hi"], "top_p": NaN}', "top_p"),
    (b'{"prompts": ["ok", "a\\ud800b"]}', "prompt 1 is not valid Unicode"),
]


@pytest.mark.parametrize(("content", "reason"), RAW_BODIES)
def test_non_finite_numbers_and_lone_surrogates_are_4xx(server_dp2, content, reason):
    start = time.monotonic()
    resp = httpx.post(f"{server_dp2.url}/generate", content=content,
                      headers={"content-type": "application/json"}, timeout=60)
    assert time.monotonic() - start < REFUSED_WITHIN_S
    assert resp.status_code in (400, 422) and reason in resp.json()["error"], resp.text
    assert server_dp2.client().generate(["ok?"], max_tokens=2).results


def test_a_text_only_model_refuses_images_and_says_so_in_info(server_dp2):
    info = server_dp2.client().info()
    assert not info.takes_images and info.max_images_per_prompt == 0
    messages = [[{"role": "user", "content": [{"type": "image", "image": "aGk="}, {"type": "text", "text": "hi"}]}]]
    resp = httpx.post(f"{server_dp2.url}/chat", json={"messages": messages, "max_tokens": 2}, timeout=60)
    assert resp.status_code == 400 and "takes no images" in resp.json()["error"], resp.text
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    text_parts = [[{"role": "user", "content": parts}]]
    plain = [[{"role": "user", "content": "What is 2+2?"}]]
    assert server_dp2.client().chat(text_parts, max_tokens=2, temperature=0.0).results[0].prompt_token_ids == \
        server_dp2.client().chat(plain, max_tokens=2, temperature=0.0).results[0].prompt_token_ids


def test_chat_lone_surrogate_is_4xx_naming_the_message(server_dp2):
    content = b'{"messages": [[{"role": "user", "content": "a\\udc00"}]]}'
    resp = httpx.post(f"{server_dp2.url}/chat", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 422 and "conversation 0 message 0" in resp.json()["error"], resp.text


def test_prompt_plus_max_tokens_over_the_context_is_never_a_500(server_dp2):
    """vLLM's own checks (here: the context length) answer 4xx with vLLM's reason, or generation stops at it."""
    resp = httpx.post(f"{server_dp2.url}/generate", json={"prompts": [[1] * 500], "max_tokens": 100}, timeout=120)
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert resp.json()["error"]
    else:
        assert len(resp.json()["results"][0]["completions"][0]["token_ids"]) <= 12
    assert server_dp2.client().generate(["ok?"], max_tokens=2).results


def test_vllm_refusing_the_sampling_is_a_400_with_vllms_reason(server_dp2):
    """vLLM 0.32 caps temperature at 2 (our type allows up to 100: releases differ); its refusal is a 400."""
    resp = httpx.post(f"{server_dp2.url}/generate", json={"prompts": ["hi"], "temperature": 5.0, "max_tokens": 2},
                      timeout=60)
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 400:
        assert "vLLM refused the sampling parameters" in resp.json()["error"] and "temperature" in resp.text
    assert server_dp2.client().generate(["ok?"], max_tokens=2).results


def test_unknown_routes_and_methods_answer_error_json(server_dp2):
    nope = httpx.get(f"{server_dp2.url}/no/such/route")
    assert nope.status_code == 404 and nope.json() == {"error": "Not Found"}
    wrong = httpx.get(f"{server_dp2.url}/generate")
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed"}


def test_request_body_over_the_cap_is_413_at_once(server_dp2):
    big = {"prompts": ["hello " * (9 * 2**20 // 6)], "max_tokens": 2}
    start = time.monotonic()
    resp = httpx.post(f"{server_dp2.url}/generate", json=big, timeout=60)
    assert time.monotonic() - start < REFUSED_WITHIN_S
    assert resp.status_code == 413 and "--max-request-bytes" in resp.json()["error"], resp.text

    def chunks():  # no content-length: the server counts what arrives
        for _ in range(10):
            yield b"x" * 2**20
    resp = httpx.post(f"{server_dp2.url}/generate", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert server_dp2.client().generate(["ok?"], max_tokens=2).results


def test_health_answers_while_long_prompts_are_tokenized(server_dp2):
    # 180 prompts of 20,501 tokens (7.4 MB, under the size cap; " a" is one token): each short enough in
    # characters to pass the bound before tokenizing (41,000 characters, 81 a token at most: >= 506 < 512
    # tokens), so 3.7M tokens are tokenized
    long = {"prompts": ["a " * 20500] * 180, "max_tokens": 2}
    answer: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answer.append(
        httpx.post(f"{server_dp2.url}/generate", json=long, timeout=300)))
    sender.start()
    time.sleep(0.5)  # the upload is done; tokenization is running
    times = []
    while sender.is_alive():
        start = time.monotonic()
        assert httpx.get(f"{server_dp2.url}/health", timeout=30).status_code == 200
        times.append(time.monotonic() - start)
        time.sleep(0.1)
    sender.join()
    assert answer[0].status_code == 400 and "prompt 0 has 20501 tokens" in answer[0].json()["error"], answer[0].text
    # at least one poll while the request was in the server; the body's JSON is parsed on the event loop
    # (one poll waited 1.7 s of it), the tokenizing runs in a thread
    assert len(times) >= 1 and max(times) < REFUSED_WITHIN_S, times


def test_work_limits_are_in_info_and_over_them_is_413_before_any_work(server_dp2):
    """Issue 25's reproductions: 100 prompts x n=1024 x 512 tokens (52M tokens of work from a 2 KB body),
    and 60,000 one-token prompts. Both used to start the work; now both are refused at once naming the cap."""
    info = server_dp2.client().info()
    assert info.max_request_tokens == 2**24 and info.max_prompts_per_request == 16_384
    url = f"{server_dp2.url}/generate"
    flood = {"prompts": ["Tell me a long story."] * 100, "n": 1024, "max_tokens": 512, "temperature": 1.0}
    resp = httpx.post(url, json=flood, timeout=REFUSED_WITHIN_S)  # today's server: a timeout, not an answer
    error = resp.json()["error"]
    assert resp.status_code == 413 and "100 prompts x n=1024" in error and "16,777,216" in error, error
    ids = {"prompts": [[1, 504, 3575, 282, 4649, 314]] * 100, "n": 1024, "max_tokens": 512, "temperature": 1.0}
    resp = httpx.post(url, json=ids, timeout=REFUSED_WITHIN_S)  # token ids: counted exactly, 53,043,200 tokens
    assert resp.status_code == 413 and "53,043,200 tokens of work" in resp.json()["error"], resp.text
    many = httpx.post(url, json={"prompts": [[1]] * 60_000, "max_tokens": 1}, timeout=REFUSED_WITHIN_S)
    assert many.status_code == 413 and "60000 prompts" in many.json()["error"], many.text
    # the control: within the caps, the same kind of request is served
    assert httpx.post(url, json={**flood, "n": 2, "max_tokens": 2}, timeout=60).status_code == 200


def test_a_text_too_long_for_the_context_is_refused_before_tokenizing(server_dp2):
    """7 MiB of text used to take ~5 s of tokenizing (and 800 MB) for its 400; its length alone proves it cannot
    fit, so the answer names characters, not the token count only tokenizing would know."""
    resp = httpx.post(f"{server_dp2.url}/generate", json={"prompts": ["hello " * (7 * 2**20 // 6)]}, timeout=30)
    assert resp.status_code == 400 and "characters, at least" in resp.json()["error"], resp.text
    short = httpx.post(f"{server_dp2.url}/generate", json={"prompts": ["hello " * 600]}, timeout=30)
    assert short.status_code == 400 and "prompt 0 has 601 tokens" in short.json()["error"]  # counted: it was tokenized


def test_stop_strings_are_bounded(server_dp2):
    url = f"{server_dp2.url}/generate"
    many = httpx.post(url, json={"prompts": ["hi"], "stop": ["x"] * 100_000}, timeout=30)
    assert many.status_code == 422 and "100000 stop strings; at most 64" in many.json()["error"], many.text
    long = httpx.post(url, json={"prompts": ["hi"], "stop": ["y" * 300]}, timeout=30)
    assert long.status_code == 422 and "300 characters" in long.json()["error"], long.text
    assert httpx.post(url, json={"prompts": ["hi"], "stop": ["\n"] * 64, "max_tokens": 2}).status_code == 200


def test_the_largest_seed_serves_one_prompt_and_head_health_answers(server_dp2):
    one = httpx.post(f"{server_dp2.url}/generate", json={"prompts": ["hi"], "seed": 2**63 - 1, "max_tokens": 2})
    assert one.status_code == 200, one.text
    two = httpx.post(f"{server_dp2.url}/generate", json={"prompts": ["hi", "ho"], "seed": 2**63 - 1})
    assert two.status_code == 400 and "2**63" in two.json()["error"]
    assert httpx.head(f"{server_dp2.url}/health").status_code == 200


def test_malformed_http_gets_a_json_400_from_the_server(server_dp2):
    """The server runs ``vroll.server.connections``' protocol (tests/server/test_connections.py checks it)."""
    host, port = server_dp2.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GARBAGE\x00 / NOT-HTTP\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400" and json.loads(body) == {"error": "malformed HTTP/1.1 request"}


def test_the_client_splits_a_batch_over_the_cap_into_requests_that_sample_the_same(server_dp2):
    """A batch over the server's work cap goes as several requests at once, each continuing the batch's
    seeds: the completions are the ones a single request gives. Control: the parts without the seed shift."""
    prompts = [[1, 504, 3575, 282, 4649, 314 + i] for i in range(7)]
    spec = SamplingSpec(n=2, max_tokens=4, temperature=1.0, seed=11)
    def ids(out: GenerateResult) -> list[list[int]]:
        return [c.token_ids for c in out.flat()]

    whole = ids(server_dp2.client().generate(prompts, spec))
    split = server_dp2.client()
    split._caps = (2 * 2 * (6 + 4), 0)  # room for two prompts a request: four requests
    assert split._parts(prompts, spec) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert ids(split.generate(prompts, spec)) == whole
    unshifted = [c for a, b in [(0, 2), (2, 4)] for c in ids(split.generate(prompts[a:b], spec))]
    assert unshifted != whole[:8]


def test_malformed_json_is_400(server_dp2):
    resp = httpx.post(f"{server_dp2.url}/generate", content=b'{"prompts": ["hi"',
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]


def test_client_raises_4xx_at_once_with_the_reason(server_dp2):
    with pytest.raises(ServerError) as err:
        server_dp2.client().generate(["hello " * 600])
    assert err.value.status == 400 and "max_model_len" in err.value.reason


def test_the_key_is_checked_before_the_body_and_the_scheme_in_any_case(server_dp1_key):
    url = server_dp1_key.url
    broken = b'{"prompts": ["hi"'
    headers = {"content-type": "application/json"}
    assert httpx.post(f"{url}/generate", content=broken, headers=headers).status_code == 401  # was 400
    keyed = httpx.post(f"{url}/generate", content=broken, headers={**headers, "Authorization": "Bearer test-secret"})
    assert keyed.status_code == 400  # the control: with the key, the broken body is what is wrong
    for scheme in ("bearer", "BEARER"):
        assert httpx.get(f"{url}/info", headers={"Authorization": f"{scheme} test-secret"}).status_code == 200
    assert httpx.get(f"{url}/info", headers={"Authorization": "Basic test-secret"}).status_code == 401
    assert httpx.head(f"{url}/health").status_code == 200


def test_api_key_is_required_except_for_health(server_dp1_key):
    url = server_dp1_key.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/info").status_code == 401
    assert httpx.post(f"{url}/generate", json={"prompts": ["x"]}).status_code == 401
    assert httpx.get(f"{url}/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert server_dp1_key.client().info().data_parallel_size == 1
    assert httpx.get(f"{url}/openapi.json").status_code == 401  # the schema lists the weight routes
    key = {"Authorization": "Bearer test-secret"}
    for page in ("/docs", "/redoc"):  # off with a key; without it, no route, real or not, answers but /health
        assert httpx.get(f"{url}{page}").status_code == 401
        assert httpx.get(f"{url}{page}", headers=key).status_code == 404
    assert "/weights/update" in httpx.get(f"{url}/openapi.json",
                                          headers={"Authorization": "Bearer test-secret"}).json()["paths"]
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
