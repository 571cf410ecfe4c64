"""One process of a sharded (ZeRO-3 or FSDP2) tiny Llama: gather it bucket by bucket and compare.

Run by ``tests/weightsync/test_sharded_source.py`` under ``torchrun`` (ZeRO-3) or ``accelerate
launch --config_file configs/fsdp2.yaml`` (FSDP2), two processes over gloo. Every rank builds
the same seeded model (optionally with LoRA adapters whose B is non-zero), keeps the expected
full tensors (the unsharded model's, LoRA merged by PEFT itself), lets vroll's accelerator
shard it, and gathers every tensor through :class:`ModelSource` in three buckets (a
collective: all ranks, same order). Rank 0 writes ``result.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vroll.trainer.config import GRPOConfig
from vroll.trainer.model.distributed import make_accelerator
from vroll.weightsync.source import ModelSource


def tiny_model(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    # big enough that ZeRO-3 partitions the matrices (persistence threshold 10 * hidden)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)  # non-zero: the merge must change q/v
    return model


def expected(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors by checkpoint name, LoRA merged by PEFT itself (an independent path)."""
    clone = copy.deepcopy(model)
    if hasattr(clone, "merge_and_unload"):
        clone = clone.merge_and_unload()
    return {n: p.detach().clone() for n, p in clone.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--deepspeed", default=None)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    cfg = GRPOConfig(deepspeed=args.deepspeed, bf16=False, per_device_train_batch_size=2, num_generations=2)
    accelerator = make_accelerator(cfg)
    model = tiny_model(args.lora)
    want = expected(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    source = ModelSource(accelerator.unwrap_model(prepared), torch.float32)
    names = [m.name for m in source.metadata()]
    got = {}
    for i in range(3):  # three buckets, as a sync would gather them
        with source.gather(names[i::3]) as tensors:
            got |= {n: t.clone() for n, t in tensors.items()}
    still_sharded = all(getattr(p, "ds_tensor", None) is not None and p.numel() == 0 or hasattr(p, "full_tensor")
                        for n, p in accelerator.unwrap_model(prepared).named_parameters() if "q_proj" in n)
    if accelerator.is_main_process:
        shapes = {m.name: list(m.shape) for m in source.metadata()}
        errors = {n: float((got[n] - want[n]).abs().max()) for n in names}
        Path(args.out, "result.json").write_text(json.dumps({
            "sharded": source.sharded, "names": names, "expected_names": sorted(want), "shapes": shapes,
            "expected_shapes": {n: list(t.shape) for n, t in want.items()}, "max_error": errors,
            "still_sharded": still_sharded, "world": accelerator.num_processes}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
