"""Run a short colocate-mode training and check the engine against the trainer after each step.

Run by ``tests/trainer/test_colocate.py`` in its own process (the colocated engine
joins a ``torch.distributed`` world and binds threads, which the test process must
not inherit). After every optimizer step the callback pushes the weights, samples a
greedy completion of a fixed prompt from the engine, and compares the engine's
per-token logprobs with a forward pass of the trainer's current model and of the
initial one. Writes ``probe.json`` in the output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from vroll.protocol import GenerateJob, PromptInput, SamplingSpec
from vroll.tasks.addition import addition_splits
from vroll.trainer.logps import completion_logps, pad_batch

PROBE = "What is 37 + 45? Answer with the number."


def logps_under(model: torch.nn.Module, prompt: list[int], completion: list[int], pad: int) -> torch.Tensor:
    batch = pad_batch([prompt], [completion], pad).to(next(model.parameters()).device)
    with torch.no_grad():
        return completion_logps(model, batch)[0][0, : len(completion)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--trainer", choices=["grpo", "online-dpo"], default="grpo")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reward", choices=["addition", "vowels"], default="addition",
                        help="vowels: a reward a random-weight model's text varies in (GPU runs)")
    parser.add_argument("--sleep", action="store_true", help="vLLM sleep mode (CUDA)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    cli = parser.parse_args()
    from vroll.trainer.config import GRPOConfig, OnlineDPOConfig
    from vroll.trainer.grpo import GRPOTrainer
    from vroll.trainer.online_dpo import OnlineDPOTrainer

    rewards = ["addition_correct", "addition_format"] if cli.reward == "addition" else ["vowel_share"]
    cpu = not torch.cuda.is_available()
    common = dict(output_dir=cli.out, model_name_or_path=cli.model, vllm_mode="colocate", vllm_enforce_eager=True,
                  vllm_kv_cache_memory_gib=1.0 if cpu else None, vllm_enable_sleep_mode=cli.sleep,
                  vllm_gpu_memory_utilization=cli.gpu_memory_utilization, max_steps=cli.steps,
                  max_completion_length=16, learning_rate=cli.lr, seed=0, reward_funcs=rewards,
                  save_final_model=False, save_only_model=True)
    rows = addition_splits(seed=2, train_size=256, test_size=0)[0]
    if cli.trainer == "grpo":
        trainer = GRPOTrainer(args=GRPOConfig(**common, per_device_train_batch_size=16, num_generations=4),
                              train_dataset=rows)
    else:
        trainer = OnlineDPOTrainer(args=OnlineDPOConfig(**common, per_device_train_batch_size=8), train_dataset=rows)
    initial = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).eval()
    tok = trainer.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": PROBE}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    records = []

    def probe(tr, metrics) -> None:  # noqa: ANN001
        tr.rollouts.push()  # the engine is otherwise updated lazily, before the next generation
        job = GenerateJob([PromptInput(prompt)], SamplingSpec(temperature=0.0, max_tokens=12), 0)
        out = tr.generator.engine.generate(job)
        comp = out[0].completions[0]
        engine = torch.tensor(comp.logprobs, device=tr.accelerator.device)
        now = logps_under(tr.accelerator.unwrap_model(tr.model).eval(), prompt, comp.token_ids, tok.pad_token_id)
        init = logps_under(initial, prompt, comp.token_ids, tok.pad_token_id)
        tr.model.train()
        records.append({"step": tr.state.global_step, "reward": metrics["reward/mean"],
                        "err_vs_trainer": float((engine - now).abs().mean()),
                        "err_vs_initial": float((engine - init).abs().mean()),
                        "trainer_moved": float((now - init).abs().mean()),
                        "engine_version": tr.generator.version, "step_s": metrics["time/step_s"],
                        "sync_s": metrics.get("time/sync_s", 0.0)})

    trainer.add_callback(probe)
    trainer.train()
    Path(cli.out, "probe.json").write_text(json.dumps(records, indent=1))
    Path(cli.out, "sampling.json").write_text(json.dumps(sampling_check(trainer.generator, prompt), indent=1))


def sampling_check(generator, prompt: list[int]) -> dict:  # noqa: ANN001
    """The colocated engine's batch-seeded sampling: the same batch and seed twice, another seed, whether
    the caller's random generators moved (they must not), and what a split batch samples (per-prompt
    seeds, ``--vllm_seed_per_prompt``: the same as the whole batch; one seed per batch: not)."""
    def sample(seed: int, prompts: int = 2, first_index: int = 3) -> list[list[int]]:
        spec = SamplingSpec(n=4, temperature=1.0, max_tokens=12, seed=seed)
        return generator.generate([PromptInput(prompt)] * prompts, spec, first_index=first_index).completion_ids

    cuda = torch.cuda.is_available()
    before = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)
    first, again, other = sample(7), sample(7), sample(8)
    after = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)
    split = {}
    for per_prompt in (True, False):
        generator.seed_per_prompt = per_prompt
        split[per_prompt] = sample(7)[4:] == sample(7, prompts=1, first_index=4)  # prompt 4's completions
    generator.seed_per_prompt = False
    return {"first": first, "again": again, "other_seed": other,
            "rng_untouched": bool(torch.equal(before[0], after[0]) and (not cuda or torch.equal(before[1], after[1]))),
            "split_alike_per_prompt": split[True], "split_alike_per_batch": split[False]}

if __name__ == "__main__":
    main()
