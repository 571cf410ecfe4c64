"""LoRA sync into ``vroll serve`` on CPU: the merged push (every weight, ``W + B @ A * scale``) against the
adapter push (``--vllm_lora_sync adapter``: the factors alone, registered as a new vLLM adapter version).

For each model (``tiny``: vroll.testing's 2-layer random model; ``embedded``: SmolLM2-135M) it wraps the base
model in all-linear LoRA of rank ``--rank`` with random B factors, starts one DP=1 server per mode (the adapter
mode's with ``--enable-lora --max-lora-rank``), pushes ``--repeats`` times and records the bytes moved, the
median push time, and the largest greedy logprob gap to the merged model afterwards (both modes must serve
it). Generation throughput with vLLM's LoRA kernels and the GPU shapes are not measured here.

    python benchmarks/lora_sync.py                       # writes benchmarks/results/lora_sync_cpu.json
    python benchmarks/lora_sync.py --models tiny --repeats 1
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import REPO_DIR, default_out, machine_info, median, print_table, running_server, write_json

from vroll.generation.server import ServerGenerator
from vroll.models import resolve_model
from vroll.protocol import SamplingSpec
from vroll.weightsync.sender import WeightSyncConfig

sys.path.insert(0, str(REPO_DIR / "tests"))
from helpers import bf16_copy, served_logprob_gaps  # noqa: E402

SERVER = ["--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-gib", "0.5", "--data-parallel-size", "1"]
PROMPTS = [[9707, 11, 1879, 0], [785, 3974, 13876, 38835, 34208]]


def model_folder(name: str, tmp: Path) -> str:
    if name == "embedded":
        return str(resolve_model(None))
    from vroll.testing import build_text_model

    return str(build_text_model("tiny", tmp / "tiny"))


def lora_model(folder: str, rank: int) -> torch.nn.Module:
    """The base model with all-linear LoRA whose B factors are random (a trained adapter's size and effect)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def measure(folder: str, model: torch.nn.Module, mode: str, rank: int, repeats: int) -> dict[str, Any]:
    flags = [*SERVER, "--model", folder]
    if mode == "adapter":
        flags += ["--enable-lora", "--max-lora-rank", str(rank)]
    with running_server(flags) as server:
        gen = ServerGenerator(server.url, None, 120, WeightSyncConfig(timeout_s=120))
        gen.lora_sync = mode
        try:
            stats = [gen.push_weights(model) for _ in range(repeats + 1)][1:]  # the first opens the session
            out = server.client().generate(PROMPTS, SamplingSpec(temperature=0.0, max_tokens=16))
        finally:
            gen.close()
    reference = bf16_copy(copy.deepcopy(model).merge_and_unload())
    return {"mode": mode, "bytes": stats[0].num_bytes, "tensors": stats[0].num_tensors,
            "push_s": median([s.seconds for s in stats]), "load_s": median([s.phases.load_s for s in stats]),
            "max_gap_vs_merged": float(served_logprob_gaps(reference, out).max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,embedded")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=default_out("lora_sync_cpu"))
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            folder = model_folder(name, Path(tmp))
            model = lora_model(folder, args.rank)
            for mode in ("merged", "adapter"):
                rows.append({"model": name, "rank": args.rank, **measure(folder, model, mode, args.rank, args.repeats)})
    print_table(["model", "mode", "bytes", "tensors", "push_s", "load_s", "max_gap"],
                [[r["model"], r["mode"], r["bytes"], r["tensors"], r["push_s"], r["load_s"], r["max_gap_vs_merged"]]
                 for r in rows], title=f"LoRA sync, rank {args.rank}, all-linear, CPU, DP=1")
    write_json(args.out, {"machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
