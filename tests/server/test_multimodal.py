"""Images through the server on the real vLLM engine: a tiny random-weight Qwen2.5-VL (one DP=1 server).

The client's ``PromptInput`` form, TRL's request body (``images``: base64 per prompt), chat image
parts, expanded prompt ids, and every bad-image case answered with a 4xx while the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from helpers import VLM_IMAGE_LIMIT, VLM_PIXEL_CAP
from vroll.client import ServerError, encode_image
from vroll.protocol import PromptInput, SamplingSpec

pytestmark = pytest.mark.slow

LIMIT, PIXEL_CAP = VLM_IMAGE_LIMIT, VLM_PIXEL_CAP  # server_vlm's --limit-mm-per-prompt and --max-image-pixels
TOKENS_112 = 16  # a 112x112 image: 8x8 patches of 14 px, merged 2x2
GREEDY = SamplingSpec(temperature=0.0, max_tokens=4)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (112, 112)) -> Image.Image:
    return Image.new("RGB", size, color)


RED, BLUE = solid((220, 30, 30)), solid((30, 30, 220))


@pytest.fixture(scope="module")
def vlm(server_vlm, tiny_vlm):
    """The shared tiny-VLM server (no test here pushes weights) and its model folder."""
    return server_vlm, Path(tiny_vlm)


@pytest.fixture(scope="module")
def tok(vlm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(vlm[1])


def chat_text(tok, n_images: int, question: str = "What is in the picture?") -> str:
    parts = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return tok.apply_chat_template([{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def test_info_says_the_model_takes_images(vlm):
    info = vlm[0].client().info()
    assert info.takes_images and info.max_images_per_prompt == LIMIT
    assert info.max_image_pixels == PIXEL_CAP and info.max_request_bytes == 256 * 2**20  # the default for a VLM


def test_image_prompts_generate_n_samples_with_expanded_prompt_ids(vlm, tok):
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    one, two = tok(chat_text(tok, 1)).input_ids, tok(chat_text(tok, 2)).input_ids
    out = vlm[0].client().generate([PromptInput(one, (RED,)), PromptInput(two, (RED, BLUE))],
                                   SamplingSpec(n=3, temperature=1.0, max_tokens=5, seed=1))
    for ids, n_images, result in zip((one, two), (1, 2), out.results, strict=True):
        assert len(result.completions) == 3
        assert all(1 <= len(c.token_ids) <= 5 and len(c.logprobs) == len(c.token_ids) for c in result.completions)
        ran = result.prompt_token_ids  # what vLLM ran: each placeholder expanded to the image's tokens
        assert len(ran) == len(ids) + n_images * (TOKENS_112 - 1)
        assert ran.count(image_id) == n_images * TOKENS_112
        collapsed = [t for i, t in enumerate(ran) if t != image_id or ran[i - 1] != image_id]
        assert collapsed == ids  # the text around the images is untouched


def test_the_image_reaches_the_model(vlm, tok):
    """Same text, other image: other logprobs (a server that dropped images would give the same)."""
    ids = tok(chat_text(tok, 1)).input_ids
    client = vlm[0].client()
    red, red2, blue = (client.generate([PromptInput(ids, (im,))], GREEDY).results[0].completions[0]
                       for im in (RED, solid((220, 30, 30)), BLUE))
    assert red.token_ids == red2.token_ids and red.logprobs == pytest.approx(red2.logprobs, abs=1e-5)
    assert red.token_ids != blue.token_ids or max(abs(a - b) for a, b in zip(red.logprobs, blue.logprobs,
                                                                            strict=True)) > 1e-3


def test_trl_request_body_and_chat_parts_agree_with_the_client(vlm, tok):
    server = vlm[0]
    text = chat_text(tok, 1)
    expected = server.client().generate([PromptInput(tok(text).input_ids, (RED,))], GREEDY).results[0]
    sampling = GREEDY.model_dump(mode="json")
    b64 = encode_image(RED)
    # TRL's vllm-serve body: texts, one base64 image (or a list, or null) per prompt
    resp = post(server, "/generate", {"prompts": [text, text, "no image here"], "images": [b64, [b64], None],
                                      **sampling})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["completions"][0]["token_ids"] for r in results[:2]] == [expected.completions[0].token_ids] * 2
    assert results[0]["prompt_token_ids"] == expected.prompt_token_ids
    jpeg = io.BytesIO()
    RED.save(jpeg, format="JPEG", quality=95)
    for part in ({"type": "image", "image": b64},
                 {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
                 {"type": "image_url", "image_url": {"url": base64.b64encode(jpeg.getvalue()).decode()}}):
        messages = [[{"role": "user", "content": [part, {"type": "text", "text": "What is in the picture?"}]}]]
        resp = post(server, "/chat", {"messages": messages, **sampling})
        assert resp.status_code == 200, resp.text
        assert resp.json()["results"][0]["prompt_token_ids"] == expected.prompt_token_ids
    out = server.client().chat([[{"role": "user", "content": [{"type": "image", "image": RED},
                                                              {"type": "text", "text": "What is in the picture?"}]}]],
                               GREEDY)
    assert out.results[0].completions[0].token_ids == expected.completions[0].token_ids


def _png(image: Image.Image) -> str:
    return encode_image(image)


def bad_cases(text1: str, text2: str, text3: str) -> list[tuple[dict, int, str]]:
    ok = _png(RED)
    return [
        ({"prompts": [text1, text1], "images": [ok, base64.b64encode(b"not an image").decode()]}, 400,
         "prompt 1 image cannot be decoded"),
        ({"prompts": [text1], "images": ["@@@ not base64 @@@"]}, 400, "prompt 0 image is not valid base64"),
        ({"prompts": [text1], "images": [ok[: len(ok) // 2 // 4 * 4]]}, 400, "prompt 0 image cannot be decoded"),
        ({"prompts": [text1], "images": ["https://example.com/cat.png"]}, 400, "fetches nothing"),
        ({"prompts": [text1], "images": ["data:image/png,abc"]}, 400, ";base64"),
        ({"prompts": [text3], "images": [[ok, ok, ok]]}, 400, f"at most {LIMIT} per prompt"),
        ({"prompts": [text1], "images": [_png(solid((0, 0, 0), (300, 300)))]}, 413, str(PIXEL_CAP)),
        ({"prompts": [text1], "images": [[ok, ok]]}, 400, "1 image placeholder(s)"),
        ({"prompts": [text2], "images": [ok]}, 400, "2 image placeholder(s)"),
        ({"prompts": [text1], "images": [None]}, 400, "but 0 image(s)"),
        ({"prompts": [text1, text1], "images": [ok]}, 400, "1 entries for 2 prompts"),
        ({"prompts": [text1], "images": [_png(solid((0, 0, 0), (1, 300)))]}, 400, "aspect ratio"),
        ({"messages": [[{"role": "user", "content": [{"type": "image", "image": "%%%"}]}]]}, 400,
         "prompt 0 image is not valid base64"),
        ({"messages": [[{"role": "user", "content": [{"type": "video", "video": ok}]}]]}, 422, "'video'"),
    ]


def test_bad_images_get_a_clear_4xx_and_the_server_keeps_serving(vlm, tok):
    server = vlm[0]
    cases = bad_cases(chat_text(tok, 1), chat_text(tok, 2), chat_text(tok, 3))
    for body, status, reason in cases:
        path = "/chat" if "messages" in body else "/generate"
        start = time.monotonic()
        resp = post(server, path, {**body, "max_tokens": 2})
        assert (resp.status_code, reason in resp.json().get("error", "")) == (status, True), (body, resp.text[:300])
        assert time.monotonic() - start < 30
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    out = server.client().generate([PromptInput(tok(chat_text(tok, 1)).input_ids, (BLUE,))], GREEDY)
    assert len(out.results[0].completions[0].token_ids) >= 1
    with pytest.raises(ServerError, match="cannot be decoded") as err:
        server.client().generate([chat_text(tok, 1)], GREEDY, images=[b"\x89PNG garbage"])
    assert err.value.status == 400
