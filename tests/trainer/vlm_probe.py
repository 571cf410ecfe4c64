"""GRPO steps on a tiny vision-language model with vLLM generating, then logprobs engine vs trainer.

Run by ``tests/trainer/test_vlm.py`` in its own process (a colocated engine joins a
``torch.distributed`` world and binds threads, which the test process must not inherit).

1. ``--steps`` GRPO steps on synthetic REC data, the engine colocated (``--mode colocate``) or a
   running ``vroll serve`` (``--mode server``); weights synced to it after the last step;
2. completions sampled by that engine for image prompts of two sizes (left and right padding
   in the trainer's batch), and their logprobs recomputed by the trainer's forward with
   ``pixel_values`` and ``image_grid_thw`` (the same tokens: the engine's expansion is checked
   against the processor's);
3. negative controls: the same forward with each image replaced by another one of its size (its
   colour negative),
   with the images removed from the prompt, and with text-only rotary positions.

Writes ``probe.json`` (mean/max |engine - trainer| logprob differences) in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from PIL import ImageOps

from vroll.generation.prompts import encode_prompts
from vroll.generation.rollout import Rollout
from vroll.protocol import PromptInput, SamplingSpec
from vroll.rewards import completion_text
from vroll.rl.losses import selective_log_softmax
from vroll.tasks.rec import rec_prompt, synthetic_rec_rows
from vroll.trainer.logps import TokenBatch, completion_logps, pad_batch, server_logps_tensor
from vroll.vision import rollout_vision


def distinct_tokens(prompts: list, completions: list, **kw: object) -> list[float]:
    """A reward a random-weight model's replies vary in (so the steps carry a gradient)."""
    texts = [completion_text(c) for c in completions]  # chat prompts: TRL's message form
    return [len(set(c)) / max(1, len(c)) for c in texts]


def _diff(logps: torch.Tensor, engine: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    d = (logps - engine).abs() * mask
    return {"mean": float(d.sum() / mask.sum()), "max": float(d.max())}


def _forward(model: torch.nn.Module, batch: TokenBatch, text_positions: bool = False) -> torch.Tensor:
    with torch.no_grad():
        if not text_positions:
            return completion_logps(model, batch)[0]
        kwargs = batch.forward_kwargs(model)
        kwargs.pop("mm_token_type_ids", None)  # the model then falls back to 1-D text positions
        out = model(**kwargs, logits_to_keep=batch.completion_ids.shape[1] + 1, use_cache=False)
        return selective_log_softmax(out.logits[:, :-1].float(), batch.completion_ids)


def _without_images(rollout: Rollout, image_ids: set[int]) -> Rollout:
    """The same completions after the prompts with every vision token removed (no images at all)."""
    ids = [[t for t in p if t not in image_ids] for p in rollout.prompt_ids]
    return dataclasses.replace(rollout, prompt_ids=ids, prompts=[PromptInput(i) for i in ids])


def probe(trainer: object, n: int = 2, max_tokens: int = 8) -> dict:
    """Sample image prompts from the trainer's generator; compare its logprobs with the trainer's forward."""
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    codec, tok = trainer.image_codec, trainer.tokenizer
    rows = synthetic_rec_rows(2, seed=11, size=56) + synthetic_rec_rows(1, seed=12, size=112)
    prompts = encode_prompts(tok, [rec_prompt(r["problem"]) for r in rows], None, [(r["image"],) for r in rows])
    spec = SamplingSpec(n=n, temperature=1.0, max_tokens=max_tokens, seed=5)
    rollout = trainer.generator.generate(prompts, spec)
    everything = range(len(rollout.texts))
    batch = pad_batch(rollout.prompt_ids, rollout.completion_ids, tok.pad_token_id)
    engine = server_logps_tensor(rollout.sampling_logps, batch.completion_ids.shape[1])
    mask = batch.completion_mask
    batch.vision = rollout_vision(codec, rollout, everything)  # also checks the engine's expansion
    # another image of the same size: the colour negative (a shape-for-shape swap moves a random model little)
    swapped = {id(p): PromptInput(p.token_ids, tuple(ImageOps.invert(im) for im in p.images)) for p in prompts}
    replaced = dataclasses.replace(batch, vision=rollout_vision(
        codec, dataclasses.replace(rollout, prompts=[swapped[id(p)] for p in rollout.prompts]), everything))
    vision_ids = {codec.image_token_id, *tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])}
    bare = _without_images(rollout, vision_ids)
    removed = pad_batch(bare.prompt_ids, bare.completion_ids, tok.pad_token_id)
    return {
        "prompt_lengths": sorted({len(p) for p in rollout.prompt_ids}),
        "completion_lengths": sorted({len(c) for c in rollout.completion_ids}),
        "match": _diff(_forward(model, batch), engine, mask),
        "image_replaced": _diff(_forward(model, replaced), engine, mask),
        "image_removed": _diff(_forward(model, removed), engine, mask),
        "text_positions": _diff(_forward(model, batch, text_positions=True), engine, mask),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a tiny VLM folder (vroll.testing.build_tiny_vlm)")
    parser.add_argument("--data", required=True, help="the synthetic REC YAML list")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["colocate", "server"], default="colocate")
    parser.add_argument("--server-url", default=None)
    parser.add_argument("--steps", type=int, default=2)
    cli = parser.parse_args()
    from vroll.trainer.config import GRPOConfig
    from vroll.trainer.grpo import GRPOTrainer

    cpu = not torch.cuda.is_available()
    config = GRPOConfig(
        output_dir=cli.out, model_name_or_path=cli.model, dataset_name=cli.data, image_root=str(Path(cli.data).parent),
        vllm_mode=cli.mode, vllm_server_base_url=cli.server_url, vllm_enforce_eager=True,
        vllm_kv_cache_memory_gib=0.5 if cpu else None, vllm_max_model_len=512, max_steps=cli.steps,
        per_device_train_batch_size=4, num_generations=2, max_completion_length=8, learning_rate=1e-3,
        reward_funcs=[distinct_tokens], beta=0.04, seed=0, save_final_model=False, save_only_model=True)
    trainer = GRPOTrainer(args=config)
    metrics = trainer.train()
    result = {"mode": cli.mode, "steps": trainer.state.global_step, "loss": metrics["loss"],
              "grad_norm": metrics["grad_norm"], "weight_version": metrics["weight_version"], **probe(trainer)}
    (Path(cli.out) / "probe.json").write_text(json.dumps(result, indent=1) + "\n")
    trainer.generator.close()


if __name__ == "__main__":
    main()
