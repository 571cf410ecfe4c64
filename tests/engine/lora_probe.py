"""Push LoRA adapters alone into a colocated engine and compare what it serves with the merged models.

Run by ``tests/engine/test_lora_adapter.py`` in its own process (a colocated engine joins a
``torch.distributed`` world and binds threads). Writes ``probe.json`` in ``--out``: greedy logprob
gaps against transformers forwards of the merged models (PEFT's ``merge_and_unload``, rounded to
bf16 as served), the adapter ids the worker holds after each push, and the error a rank above the
engine's ``max_lora_rank`` gives.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import bf16_copy, make_tiny_model, served_logprob_gaps  # noqa: E402
from vroll.engine.config import EngineConfig, EngineSpec  # noqa: E402
from vroll.generation.colocate import ColocateGenerator  # noqa: E402
from vroll.protocol import GenerateJob, GenerateResult, PromptInput, SamplingSpec  # noqa: E402

PROMPTS = [[9707, 11, 1879, 0], [785, 3974, 13876, 38835, 34208]]


def adapted(base: torch.nn.Module, r: int, seed: int) -> torch.nn.Module:
    """A PEFT copy of ``base`` with all-linear LoRA whose B factors are random (a trained-looking adapter)."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def unsupported_error(gen: ColocateGenerator, base: torch.nn.Module) -> str | None:
    """The error of an adapter on the embeddings, which vLLM 0.32's LoRA does not serve for this model."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "embed_tokens"])
    model = get_peft_model(copy.deepcopy(base), config)
    try:
        gen.push_weights(model)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return str(exc)
    return None


def merged(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return bf16_copy(copy.deepcopy(model).merge_and_unload())


def greedy(gen: ColocateGenerator) -> GenerateResult:
    job = GenerateJob([PromptInput(p) for p in PROMPTS], SamplingSpec(temperature=0.0, max_tokens=12), 0)
    try:
        return GenerateResult(gen.engine.generate(job), gen.version)
    finally:
        gen.engine.sleep()


def grpo(out: Path) -> None:
    """Two GRPO steps of a LoRA policy in colocate mode with ``vllm_lora_sync="adapter"``; then the final adapter
    is pushed and what the engine serves is compared with the merged final policy (and the base model)."""
    from vroll.tasks.addition import addition_splits
    from vroll.trainer.config import GRPOConfig
    from vroll.trainer.grpo import GRPOTrainer

    folder = make_tiny_model(out / "tiny")
    args = GRPOConfig(output_dir=str(out / "run"), model_name_or_path=str(folder), vllm_mode="colocate",
                      vllm_enforce_eager=True, vllm_kv_cache_memory_gib=0.25, max_steps=2, max_completion_length=8,
                      per_device_train_batch_size=8, num_generations=4, learning_rate=0.05, seed=3,
                      reward_funcs=["vowel_share"], use_peft=True, lora_r=8, lora_alpha=16,
                      lora_target_modules=["all-linear"], vllm_lora_sync="adapter", save_final_model=False,
                      save_only_model=True)
    trainer = GRPOTrainer(args=args, train_dataset=addition_splits(seed=2, train_size=64, test_size=0)[0])
    trainer.train()
    trainer.rollouts.push()  # the final adapter (pushes are otherwise lazy, before the next generation)
    served = greedy(trainer.generator)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    record = {"vs_merged": float(served_logprob_gaps(merged(policy), served).max()),
              "vs_base": float(served_logprob_gaps(bf16_copy(base), served).max()),
              "sync_bytes": trainer.rollouts.last_sync.num_bytes, "version": trainer.generator.version}
    (out / "grpo.json").write_text(json.dumps(record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--grpo", action="store_true", help="a short GRPO run instead of pushes of made-up adapters")
    cli = parser.parse_args()
    out = Path(cli.out)
    if cli.grpo:
        grpo(out)
        return
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(out / "tiny")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = EngineConfig(dtype="bfloat16", enforce_eager=True, max_model_len=256, kv_cache_memory_gib=0.25,
                          enable_lora=True, max_lora_rank=8)
    spec = EngineSpec(str(folder), "tiny", config=config, distributed_executor_backend="external_launcher")
    gen = ColocateGenerator(spec, bucket_mb=64, lora_sync="adapter")
    first, second = adapted(base, 8, seed=1), adapted(base, 8, seed=2)
    record: dict = {}
    before = greedy(gen)
    record["before_vs_merged1"] = float(served_logprob_gaps(merged(first), before).max())
    stats = gen.push_weights(first)
    record["push1"] = dict(bytes=stats.num_bytes, tensors=stats.num_tensors, seconds=stats.seconds)
    out1 = greedy(gen)
    gaps = served_logprob_gaps(merged(first), out1)
    record["after1_vs_merged1"], record["after1_vs_merged1_mean"] = float(gaps.max()), float(gaps.mean())
    record["after1_vs_base"] = float(served_logprob_gaps(bf16_copy(base), out1).max())
    gen.push_weights(second)
    out2 = greedy(gen)
    record["after2_vs_merged2"] = float(served_logprob_gaps(merged(second), out2).max())
    record["after2_vs_merged1"] = float(served_logprob_gaps(merged(first), out2).max())
    record["adapters"] = gen.engine.llm.collective_rpc(lambda w: sorted(w.model_runner.lora_manager.list_adapters()))
    record["versions"] = [gen.engine.lora.version, gen.version]
    try:
        gen.push_weights(adapted(base, 16, seed=3))
        record["rank_error"] = None
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        record["rank_error"] = str(exc)
    record["unsupported_error"] = unsupported_error(gen, base)
    record["kept_after_errors"] = float(served_logprob_gaps(merged(second), greedy(gen)).max())
    (out / "probe.json").write_text(json.dumps(record, indent=1))
    gen.close()


if __name__ == "__main__":
    main()
