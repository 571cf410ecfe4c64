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


def merged(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return bf16_copy(copy.deepcopy(model).merge_and_unload())


def greedy(gen: ColocateGenerator) -> GenerateResult:
    job = GenerateJob([PromptInput(p) for p in PROMPTS], SamplingSpec(temperature=0.0, max_tokens=12), 0)
    try:
        return GenerateResult(gen.engine.generate(job), gen.version)
    finally:
        gen.engine.sleep()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
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
    (out / "probe.json").write_text(json.dumps(record, indent=1))
    gen.close()


if __name__ == "__main__":
    main()
