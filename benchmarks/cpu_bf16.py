"""bf16 autocast against float32 for one training forward+backward on this CPU.

Why ``--bf16`` trains float32 on a CPU without native bf16 (``vroll.trainer.model.distributed``):
torch emulates bf16 there. Prints seconds per phase and the ratio bf16 / float32; writes JSON.

    python benchmarks/cpu_bf16.py [--model smollm2-135m] [--batch 4] [--tokens 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def timed_step(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> dict[str, float]:
    """Seconds of one forward and one backward (the mean token logprob as loss)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(ids).logits
    loss = torch.log_softmax(logits.float(), -1).mean()
    forward = time.perf_counter() - start
    loss.backward()
    return {"forward_s": forward, "backward_s": time.perf_counter() - start - forward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/cpu_bf16.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from vroll.models import resolve_model
    from vroll.trainer.model.distributed import native_cpu_bf16

    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens))
    timed_step(model, ids[:, :8], bf16=False)  # warm-up
    result = {"model": args.model, "batch": args.batch, "tokens": args.tokens, "threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_cpu_bf16()}
    for name, bf16 in (("float32", False), ("bf16_autocast", True)):
        result[name] = timed_step(model, ids, bf16)
        print(name, {k: round(v, 2) for k, v in result[name].items()}, flush=True)
    total = {k: sum(result[k].values()) for k in ("float32", "bf16_autocast")}
    result["ratio_bf16_over_float32"] = total["bf16_autocast"] / total["float32"]
    print(f"bf16 autocast / float32: {result['ratio_bf16_over_float32']:.1f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
