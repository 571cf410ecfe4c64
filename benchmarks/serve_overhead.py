"""Generation throughput through ``vroll serve`` vs the same vLLM engine in-process.

Measures generated tokens/s for one fixed batch (default 32 prompts x n=1, 64 tokens
each with ``ignore_eos`` so every run generates exactly the same number of tokens,
temperature 1.0, fixed seed):

- ``inproc``: ``VLLMEngine`` built from the ``EngineSpec`` that ``vroll serve`` would
  build, called directly with a ``GenerateJob`` (no HTTP, no replica pipe), in its own
  process with the same CPU binding / GPU a DP=1 replica gets;
- ``server DP=D``: ``GenerationClient.generate`` against ``vroll serve
  --data-parallel-size D`` (one entry per ``--dp-list`` value), same prompt token ids.

Only one engine set runs at a time. Each mode is warmed up once, then timed
``--repeats`` times; the median is reported.

How to read it: ``server overhead %`` = (inproc tok/s / server DP=1 tok/s - 1) * 100 is
what the HTTP server, JSON and the replica pipe cost over calling vLLM directly (goal:
<= 5 %). ``DP2/DP1`` is the throughput ratio of 2 replicas over 1 on the same batch
(on a CPU machine the cores are split between the replicas, so expect ~1x there; on
GPUs, with one GPU per replica, up to 2x).

    python benchmarks/serve_overhead.py                     # full size
    python benchmarks/serve_overhead.py --prompts 4 --max-tokens 8 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from _common import (
    cuda_available,
    default_out,
    machine_info,
    median,
    print_table,
    running_server,
    timed,
    write_json,
)

from vroll.protocol import EngineSpec, GenerateJob, SamplingSpec

NAME = "serve_overhead"
OVERHEAD_GOAL_PCT = 5.0
TOPICS = ["a lighthouse", "a dragon", "the moon", "a small robot", "a lost key", "an old map", "a storm",
          "a violin", "a desert", "a library", "a fox", "a train"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    on_gpu = cuda_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="served model (embedded alias, HF id or folder)")
    p.add_argument("--prompts", type=int, default=32, help="prompts in the batch")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (ignore_eos: exact)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    p.add_argument("--dp-list", default="1,2", help="comma-separated server data-parallel sizes")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=not on_gpu,
                   help="no torch.compile/CUDA graphs (default: on for CPU, off for GPU)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-cache-memory-gib", type=float, default=None if on_gpu else 0.5,
                   help="KV cache per replica (default 0.5 on CPU; GPU: from gpu_memory_utilization)")
    p.add_argument("--skip-inproc", action="store_true", help="only the server modes (no overhead %%)")
    p.add_argument("--out", default=default_out(NAME), help="JSON results path")
    args = p.parse_args(argv)
    args.dp_list = [int(x) for x in str(args.dp_list).split(",") if x.strip()]
    return args


def make_prompt_ids(model: str, count: int) -> list[list[int]]:
    """``count`` distinct short prompts, tokenized with the model's tokenizer."""
    from transformers import AutoTokenizer

    from vroll.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    texts = [f"Story {i}: write a short story about {TOPICS[i % len(TOPICS)]} and what it saw."
             for i in range(count)]
    return [list(tok(t).input_ids) for t in texts]


def sampling(args: argparse.Namespace) -> SamplingSpec:
    return SamplingSpec(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens,
                        seed=args.seed, ignore_eos=True)


def serve_flags(args: argparse.Namespace, dp: int) -> list[str]:
    flags = ["--model", args.model, "--data-parallel-size", str(dp), "--max-model-len", str(args.max_model_len),
             "--enforce-eager", str(args.enforce_eager).lower(), "--log-level", "warning"]
    if args.kv_cache_memory_gib is not None:
        flags += ["--kv-cache-memory-gib", str(args.kv_cache_memory_gib)]
    return flags


def engine_spec(args: argparse.Namespace) -> tuple[EngineSpec, dict[str, str]]:
    """The spec and device environment that ``vroll serve`` gives a DP=1 replica."""
    from vroll.server.config import ServeConfig
    from vroll.server.pool import device_slices

    env = device_slices(1, 1)[0].env
    cfg = ServeConfig(model=args.model, data_parallel_size=1, max_model_len=args.max_model_len,
                      enforce_eager=args.enforce_eager, kv_cache_memory_gib=args.kv_cache_memory_gib,
                      log_level="warning")
    return cfg.engine_spec("VLLM_CPU_OMP_THREADS_BIND" in env), env


def summarize(label: str, runs: list[tuple[float, int]]) -> dict[str, Any]:
    seconds = [s for s, _ in runs]
    tokens = runs[0][1]
    med = median(seconds)
    return {"mode": label, "tokens": tokens, "seconds": seconds, "median_s": med, "tokens_per_s": tokens / med}


def _inproc_child(spec: EngineSpec, env: dict[str, str], job: GenerateJob, repeats: int, conn: Connection) -> None:
    """Spawned: build the engine with the replica's device env, warm up, time ``repeats`` runs."""
    os.environ.update(env)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vroll.engine.vllm_adapter import VLLMEngine

    engine = VLLMEngine(spec)

    def run() -> int:
        return sum(len(c.token_ids) for r in engine.generate(job) for c in r.completions)

    run()
    conn.send([timed(run) for _ in range(repeats)])
    conn.close()


def bench_inproc(args: argparse.Namespace, ids: list[list[int]]) -> dict[str, Any]:
    spec, env = engine_spec(args)
    print(f"in-process engine: {spec.model} (env {env})", flush=True)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_inproc_child, args=(spec, env, GenerateJob(ids, sampling(args), 0),
                                                   args.repeats, child))
    proc.start()
    child.close()
    try:
        runs = parent.recv()
    except EOFError:
        runs = None
    proc.join()
    if runs is None:
        raise RuntimeError(f"in-process engine process failed (exit code {proc.exitcode}); see its output above")
    out = summarize("inproc", runs)
    out["spec"] = asdict(spec)
    return out


def bench_server(args: argparse.Namespace, ids: list[list[int]], dp: int) -> dict[str, Any]:
    print(f"server DP={dp}:", flush=True)
    s = sampling(args)
    with running_server(serve_flags(args, dp)) as server, server.client(timeout=3600.0) as client:
        def run() -> int:
            out = client.generate(ids, n=s.n, temperature=s.temperature, max_tokens=s.max_tokens,
                                  seed=s.seed, ignore_eos=True)
            return sum(len(c.token_ids) for c in out.flat())

        run()
        runs = [timed(run) for _ in range(args.repeats)]
    out = summarize(f"server_dp{dp}", runs)
    out["dp"] = dp
    return out


def report(args: argparse.Namespace, modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print the table and the two headline ratios; returns them."""
    inproc = modes.get("inproc")
    base = inproc["tokens_per_s"] if inproc else None
    rows = [[m["mode"], m["tokens"], m["median_s"], m["tokens_per_s"],
             m["tokens_per_s"] / base if base else None] for m in modes.values()]
    print_table(["mode", "tokens", "median s", "tokens/s", "vs inproc"], rows,
                title=f"{args.prompts} prompts x n={args.n} x {args.max_tokens} tokens, median of {args.repeats}")
    dp1, dp2 = modes.get("server_dp1"), modes.get("server_dp2")
    overhead = (base / dp1["tokens_per_s"] - 1) * 100 if base and dp1 else None
    dp_ratio = dp2["tokens_per_s"] / dp1["tokens_per_s"] if dp1 and dp2 else None
    if overhead is not None:
        verdict = "OK" if overhead <= OVERHEAD_GOAL_PCT else "ABOVE GOAL"
        print(f"\nserver overhead: {overhead:+.1f} % (inproc/server_dp1 - 1; goal <= {OVERHEAD_GOAL_PCT:.0f} %): "
              f"{verdict}")
    if dp_ratio is not None:
        print(f"DP2/DP1 throughput: {dp_ratio:.2f}x")
    return {"server_overhead_pct": overhead, "overhead_goal_pct": OVERHEAD_GOAL_PCT,
            "overhead_within_goal": None if overhead is None else overhead <= OVERHEAD_GOAL_PCT,
            "dp2_over_dp1": dp_ratio}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    ids = make_prompt_ids(args.model, args.prompts)
    modes: dict[str, dict[str, Any]] = {}
    if not args.skip_inproc:
        modes["inproc"] = bench_inproc(args, ids)
    for dp in args.dp_list:
        modes[f"server_dp{dp}"] = bench_server(args, ids, dp)
    summary = report(args, modes)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    path = write_json(args.out, {"benchmark": NAME, "machine": machine_info(), "config": config,
                                 "load_avg_at_start": load_at_start, "modes": modes, **summary})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
