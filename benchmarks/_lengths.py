"""Imposed completion lengths for the benchmarks: every leg (vroll, TRL) generates the same lengths.

Random-weight models never stop on their own, and ``ignore_eos`` with one ``max_tokens`` makes
every completion run to the cap: no padding, nothing like a reasoning batch. Here one patch of
vLLM's ``LLM.generate`` (in the process that runs the engine: the trainer, in colocate mode)
turns each prompt's ``n`` samples into ``n`` requests of one sample, each with its own
``max_tokens`` and ``ignore_eos``, and gives the outputs back grouped as asked. The length of
the k-th completion of the c-th ``generate`` call of the process is drawn from a seeded
generator keyed by (seed, c, k): vroll (``n`` samples per prompt) and TRL (``n=1``, each prompt
repeated) both number their completions prompt-major, so step c of every leg trains on the same
lengths whatever prompts its sampler picked.

Lengths: ``min + (max - min) * u ** skew`` with u uniform (skew 1: uniform; 3: most short, a long
tail up to the cap, mean min + (max - min) / 4); ``skew 0``: every completion at the cap.

Not a benchmark itself. Two uses:

    from _lengths import LengthSpec, install   # in a process that will build a vllm.LLM
    install(LengthSpec(seed=0, low=256, high=4096, skew=3.0))

    # a child process: the spec from $VROLL_BENCH_LENGTHS (JSON), then the module's CLI, e.g. vroll's
    VROLL_BENCH_LENGTHS='{"seed": 0, "low": 256, "high": 4096, "skew": 3}' \
        python benchmarks/_lengths.py -m vroll grpo ...

With ``$VROLL_BENCH_PEAK`` set to a path, the process writes its peak CUDA memory (the torch
allocator's: the trainer's weights, optimizer, activations and logits; a sleeping vLLM's memory
lives in its own pool) and the lengths it imposed there as JSON when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

ENV_SPEC, ENV_PEAK = "VROLL_BENCH_LENGTHS", "VROLL_BENCH_PEAK"


@dataclass
class LengthSpec:
    seed: int = 0
    low: int = 256
    high: int = 4096
    skew: float = 3.0
    imposed: list[list[int]] = field(default_factory=list)  # per generate call, the lengths given

    def length(self, call: int, k: int) -> int:
        """The k-th completion's length in the process's ``call``-th generate."""
        import random

        if self.skew == 0:
            return self.high
        u = random.Random(f"{self.seed}:{call}:{k}").random()
        return self.low + int((self.high - self.low) * u**self.skew)


def install(spec: LengthSpec) -> None:
    """Patch ``vllm.LLM.generate`` in this process (idempotent per process: the last spec wins)."""
    from vllm import LLM

    original = getattr(LLM.generate, "__wrapped_by_vroll_bench__", LLM.generate)

    def generate(self: Any, prompts: Any, sampling_params: Any = None, **kwargs: Any) -> Any:
        single = not isinstance(prompts, list | tuple)
        prompts = [prompts] if single else list(prompts)
        params = sampling_params if isinstance(sampling_params, list | tuple) else [sampling_params] * len(prompts)
        call, lengths = len(spec.imposed), []
        flat_prompts, flat_params, sizes = [], [], []
        for prompt, param in zip(prompts, params, strict=True):
            sizes.append(param.n)
            for j in range(param.n):
                one = param.clone()
                one.n, one.max_tokens, one.ignore_eos = 1, spec.length(call, len(lengths)), True
                if param.seed is not None:  # n requests of one seeded prompt would all draw the same tokens
                    one.seed = param.seed * 1009 + j
                lengths.append(one.max_tokens)
                flat_prompts.append(prompt)
                flat_params.append(one)
        spec.imposed.append(lengths)
        outputs = original(self, flat_prompts, flat_params, **kwargs)
        return _regroup(outputs, sizes)

    generate.__wrapped_by_vroll_bench__ = original  # type: ignore[attr-defined]
    LLM.generate = generate


def _regroup(outputs: list[Any], sizes: list[int]) -> list[Any]:
    """One RequestOutput per original prompt, holding its n completions (indexed 0..n-1)."""
    grouped, at = [], 0
    for n in sizes:
        part = outputs[at:at + n]
        at += n
        first = part[0]
        first.outputs = [o.outputs[0] for o in part]
        for j, completion in enumerate(first.outputs):
            completion.index = j
        grouped.append(first)
    return grouped


def _write_peak(path: str, spec: LengthSpec) -> None:
    import torch

    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    with open(path, "w") as f:
        json.dump({"peak_cuda_bytes": peak, "imposed_lengths": spec.imposed}, f)


def main() -> None:
    """``python benchmarks/_lengths.py -m MODULE ARGS...``: install the spec from the environment, then run MODULE."""
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        raise SystemExit("usage: VROLL_BENCH_LENGTHS='{...}' python benchmarks/_lengths.py -m MODULE [ARGS...]")
    spec = LengthSpec(**json.loads(os.environ[ENV_SPEC]))
    install(spec)
    if os.environ.get(ENV_PEAK):
        atexit.register(_write_peak, os.environ[ENV_PEAK], spec)
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def spec_env(spec: LengthSpec) -> dict[str, str]:
    """The environment variable a child process reads its spec from."""
    data = asdict(spec)
    data.pop("imposed")
    return {ENV_SPEC: json.dumps(data)}


if __name__ == "__main__":
    main()
