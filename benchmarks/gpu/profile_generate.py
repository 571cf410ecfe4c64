"""Where the generate phase's time goes: vLLM's own ``LLM.generate`` against vroll's engine, one knob at a time.

Every leg runs in its own process (a fresh engine, the GPU memory freed between legs) on the same batch:
``--prompts`` prompts x ``--n`` samples x ``--max-tokens`` tokens with ``ignore_eos`` (random weights: the
length is fixed so every leg decodes the same number of tokens). The legs, each one change from the one above:

- ``vllm``: ``LLM.generate`` as a user would call it (n samples, no logprobs, no per-request seed), with
  vLLM's default engine-core process (its output loop overlaps the GPU steps);
- ``vllm-inproc``: the engine core in this process, as colocate mode (and TRL's colocate) must run it;
- ``+logprobs``: the sampled token's logprob (``logprobs=0``, ``logprobs_mode="raw_logprobs"``), as vroll asks;
- ``+nodetok``: ``detokenize=False`` (text decoded once afterwards, as vroll now does);
- ``+seed``: a seed per prompt (vLLM then samples those rows with their own generators);
- ``+async``: ``+nodetok`` with vLLM's async scheduling (CPU work of step i+1 overlaps the GPU's step i);
- ``vroll``: ``VLLMEngine.generate`` of colocate mode (the engine spec the trainer builds, our SamplingParams);
- ``vroll-noseed``: the same without a seed;
- ``mp+flat``: ``+flat`` with vLLM's default engine-core process (the output loop, logprobs
  included, runs in this process while the engine core steps the GPU in its own): what an engine
  in its own process would give colocate mode;
- ``vroll-mp``: ``vroll`` with the engine core in its own process.
- ``vroll-colocate``: ``ColocateGenerator.generate`` with the engine spec colocate mode builds
  (``external_launcher``, ``max_num_seqs`` = the batch) and the trainer's sampling (seeded, logprobs).
- ``server``: a server replica's engine (``AsyncVLLMEngine``: vLLM's async engine, its core in its
  own process) with the trainer's sampling, a seed per prompt as the server keeps them;
- ``server-noseed``: the same unseeded (what per-request generators cost the server's decode loop).

``--cprofile N``: after timing, run N more calls under ``cProfile`` and keep the functions with the most
own time (``top_self``) and the most time below them (``top_cumulative``) in the JSON.

Prints seconds per generate, decode tokens/s and the ratio to ``vllm``; writes JSON.

    python benchmarks/gpu/profile_generate.py --model /tmp/vroll-gpu-model/qwen2.5-0.5b --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

LEGS = ("vllm", "vllm-inproc", "+logprobs", "+nodetok", "+flat", "+seed", "+async", "vroll", "vroll-noseed",
        "mp+flat", "vroll-mp", "vroll-colocate", "server", "server-noseed")
IN_OWN_PROCESS = ("vllm", "mp+flat", "vroll-mp", "server", "server-noseed")  # legs whose engine core is a child process
KNOBS = {  # leg: (logprobs, detokenize, seed per prompt)
    "vllm": (False, True, False), "vllm-inproc": (False, True, False), "+logprobs": (True, True, False),
    "+nodetok": (True, False, False), "+flat": (True, False, False), "+seed": (True, False, True),
    "+async": (True, False, False), "mp+flat": (True, False, False)}


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    texts = [f"Question {i}: what is {17 * i + 3} + {29 * i + 11}? Think step by step." for i in range(args.prompts)]
    return [tok(t).input_ids for t in texts]


def _vllm_leg(leg: str, args: argparse.Namespace, prompts: list[list[int]]) -> list[float]:
    from vllm import LLM, SamplingParams

    logprobs, detokenize, seeded = KNOBS[leg]
    extra: dict[str, Any] = {"logprobs_mode": "raw_logprobs"} if logprobs else {}
    if leg == "+async":
        extra["async_scheduling"] = True
    llm = LLM(args.model, gpu_memory_utilization=args.gpu_memory_utilization, seed=0,
              max_model_len=args.max_model_len, **extra)
    tokenizer = llm.get_tokenizer()

    def params(i: int) -> Any:
        return SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True,
                              logprobs=0 if logprobs else None, seed=i if seeded else None, detokenize=detokenize,
                              **({"flat_logprobs": True} if leg in ("+flat", "mp+flat") else {}))

    batch = [{"prompt_token_ids": p} for p in prompts]
    sp = [params(i) for i in range(len(prompts))]

    def run() -> None:
        outs = llm.generate(batch, sp, use_tqdm=False)
        if not detokenize:  # the texts still have to exist: decode them once, as vroll does
            tokenizer.batch_decode([c.token_ids for o in outs for c in o.outputs], skip_special_tokens=True)
    return _time(run, args.repeats, args)


def _spec(args: argparse.Namespace, **extra: Any) -> Any:
    """The engine the vroll legs build (``extra``: what differs from a server replica's)."""
    from vroll.engine.config import EngineConfig, EngineSpec

    config = EngineConfig(max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization)
    return EngineSpec(model=args.model, served_name="bench", config=config, **{"seed": 0, **extra})


def _sampling(args: argparse.Namespace, seed: int | None) -> Any:
    """The vroll legs' sampling: every completion runs to ``max_tokens``, logprobs on (the trainer's default)."""
    from vroll.protocol import SamplingSpec

    return SamplingSpec(n=args.n, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=seed)


def _vroll_leg(leg: str, args: argparse.Namespace, prompts: list[list[int]]) -> list[float]:
    from vroll.engine.vllm_adapter import VLLMEngine
    from vroll.protocol import GenerateJob, PromptInput

    engine = VLLMEngine(_spec(args))
    sampling = _sampling(args, None if leg == "vroll-noseed" else 1234)
    job = GenerateJob([PromptInput(p) for p in prompts], sampling, 0)
    return _time(lambda: engine.generate(job), args.repeats, args)


def _colocate_leg(leg: str, args: argparse.Namespace, prompts: list[list[int]]) -> list[float]:
    from vroll.generation.colocate import ColocateGenerator
    from vroll.protocol import PromptInput

    spec = _spec(args, seed=42, max_num_seqs=len(prompts) * args.n, distributed_executor_backend="external_launcher")
    generator = ColocateGenerator(spec, bucket_mb=1024)
    sampling = _sampling(args, 42 * 100_003)  # the trainer's seed for batch 0 (seed 42)
    batch = [PromptInput(p) for p in prompts]
    return _time(lambda: generator.generate(batch, sampling, 0), args.repeats, args)


def _server_leg(leg: str, args: argparse.Namespace, prompts: list[list[int]]) -> list[float]:
    """Timed in the engine's own event loop (cProfile would see only this process's side)."""
    import asyncio

    from vroll.engine.vllm_adapter import AsyncVLLMEngine
    from vroll.protocol import GenerateJob, PromptInput

    job = GenerateJob([PromptInput(p) for p in prompts], _sampling(args, None if leg == "server-noseed" else 1234), 0)

    async def timed() -> list[float]:
        engine = AsyncVLLMEngine.create(_spec(args))  # inside the loop that will use it
        try:
            await engine.generate(job, "warmup")
            out = []
            for i in range(args.repeats):
                start = time.perf_counter()
                await engine.generate(job, f"bench-{i}")
                out.append(time.perf_counter() - start)
            return out
        finally:
            engine.shutdown()

    return asyncio.run(timed())


def _time(fn: Any, repeats: int, args: argparse.Namespace | None = None) -> list[float]:
    fn()  # warm-up: CUDA graphs captured, allocator primed
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    if args is not None and args.cprofile:
        _cprofile(fn, args)
    return out


def _cprofile(fn: Any, args: argparse.Namespace) -> None:
    """Run ``fn`` ``args.cprofile`` times under cProfile; the top functions go to ``args.stats_out``."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    for _ in range(args.cprofile):
        prof.runcall(fn)
    stats = pstats.Stats(prof)
    rows = [(f"{Path(f).name}:{line}:{name}", cc, nc, tt, ct)
            for (f, line, name), (cc, nc, tt, ct, _) in stats.stats.items()]  # type: ignore[attr-defined]
    top = {"calls": args.cprofile,
           "top_self": [r for r in sorted(rows, key=lambda r: -r[3])[:40]],
           "top_cumulative": [r for r in sorted(rows, key=lambda r: -r[4])[:60]]}
    Path(args.stats_out).write_text(json.dumps(top, indent=1))


def _child(leg: str, args: argparse.Namespace, conn: Any) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if leg in IN_OWN_PROCESS else "0"
    prompts = _prompts(args)
    args.stats_out = str(args.out.with_name(f"{args.out.stem}.{leg}.cprofile.json"))
    run = (_colocate_leg if leg == "vroll-colocate" else _server_leg if leg.startswith("server")
           else _vroll_leg if leg.startswith("vroll") else _vllm_leg)
    conn.send(run(leg, args, prompts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--legs", default=",".join(LEGS))
    p.add_argument("--cprofile", type=int, default=0, help="extra calls profiled with cProfile (vroll legs)")
    p.add_argument("--out", type=Path, default=Path("profile_generate.json"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    results: dict[str, Any] = {}
    tokens = args.prompts * args.n * args.max_tokens
    for leg in args.legs.split(","):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(leg, args, child))
        proc.start()
        times = parent.recv() if parent.poll(900) else []
        proc.join()
        if not times:
            print(f"{leg}: failed (exit {proc.exitcode})", flush=True)
            continue
        s = statistics.median(times)
        results[leg] = {"seconds": s, "all": times, "tokens_per_s": tokens / s,
                        "ms_per_decode_step": 1e3 * s / args.max_tokens}
        base = results.get("vllm", {}).get("seconds")
        ratio = f" ({s / base:.2f}x vllm)" if base else ""
        print(f"{leg:>14}: {s:.3f} s/generate, {tokens / s:,.0f} tok/s, "
              f"{1e3 * s / args.max_tokens:.2f} ms/step{ratio}", flush=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "legs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
