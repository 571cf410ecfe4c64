"""Generation throughput through ``vroll serve`` vs the same vLLM engine in-process.

One fixed batch (``ignore_eos``: every run generates exactly ``--max-tokens`` per
completion), timed as ``inproc`` (the engine ``vroll serve`` would build, called
directly in its own process) and as ``server_dpD`` (``GenerationClient`` -> HTTP ->
``vroll serve --data-parallel-size D``), one engine at a time, median of ``--repeats``.
``server overhead %`` = inproc tok/s / server DP=1 tok/s - 1 (goal <= 5 %); ``--one-token``
adds ``max_tokens=1`` runs (the fixed cost of a call); ``--sync-repeats`` times a gloo
weight sync of the model into the first server.

    python benchmarks/serve_overhead.py                                          # CPU, full size
    python benchmarks/serve_overhead.py --prompts 4 --max-tokens 8 --repeats 1   # smoke
    python benchmarks/serve_overhead.py --device cuda --model /tmp/qwen05b --prompts 64 --max-tokens 128 \
        --one-token --sync-repeats 3          # one GPU (model from benchmarks/gpu/make_model.py)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from _common import (
    add_device_flags,
    default_out,
    engine_spec,
    machine_info,
    median,
    model_meta,
    print_table,
    resolve_device,
    running_server,
    serve_device_flags,
    time_gloo_sync,
    timed,
    write_json,
)

from vroll.engine.config import EngineSpec
from vroll.protocol import GenerateJob, PromptInput, SamplingSpec

NAME = "serve_overhead"
OVERHEAD_GOAL_PCT = 5.0
TOPICS = ["a lighthouse", "a dragon", "the moon", "a small robot", "a lost key", "an old map", "a storm",
          "a violin", "a desert", "a library", "a fox", "a train"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="served model (embedded alias, HF id or folder)")
    p.add_argument("--prompts", type=int, default=32, help="prompts in the batch")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (ignore_eos: exact)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    p.add_argument("--data-parallel-size", dest="dp_list", default=None, metavar="D[,D...]",
                   help="server data-parallel sizes, one server each (unset: 1,2 on cpu, 1 on cuda)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--skip-inproc", action="store_true", help="only the server modes (no overhead %%)")
    p.add_argument("--one-token", action="store_true", help="also time max_tokens=1 (fixed cost per call)")
    p.add_argument("--sync-repeats", type=int, default=0,
                   help="time a gloo weight sync into the first server this many times after a warm-up (0: none)")
    p.add_argument("--out", default=default_out(NAME), help="JSON results path")
    add_device_flags(p)
    args = p.parse_args(argv)
    resolve_device(p, args)
    default_dp = "1,2" if args.device == "cpu" else "1"
    args.dp_list = [int(x) for x in str(args.dp_list or default_dp).split(",") if x.strip()]
    return args


def make_prompt_ids(model: str, count: int) -> list[list[int]]:
    """``count`` distinct short prompts, tokenized with the model's tokenizer."""
    from transformers import AutoTokenizer

    from vroll.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    texts = [f"Story {i}: write a short story about {TOPICS[i % len(TOPICS)]} and what it saw."
             for i in range(count)]
    return [list(tok(t).input_ids) for t in texts]


def sampling(args: argparse.Namespace, max_tokens: int) -> SamplingSpec:
    return SamplingSpec(n=args.n, temperature=args.temperature, max_tokens=max_tokens,
                        seed=args.seed, ignore_eos=True)


def token_counts(args: argparse.Namespace) -> dict[str, int]:
    """Mode-name suffix -> max_tokens of the timed runs."""
    return {"": args.max_tokens, **({"_1tok": 1} if args.one_token else {})}


def serve_flags(args: argparse.Namespace, dp: int) -> list[str]:
    return ["--model", args.model, "--data-parallel-size", str(dp), "--max-model-len", str(args.max_model_len),
            "--log-level", "warning", *serve_device_flags(args)]


def summarize(label: str, runs: list[tuple[float, int]]) -> dict[str, Any]:
    seconds = [s for s, _ in runs]
    tokens = runs[0][1]
    med = median(seconds)
    return {"mode": label, "tokens": tokens, "seconds": seconds, "median_s": med, "tokens_per_s": tokens / med}


def _inproc_child(spec: EngineSpec, env: dict[str, str], jobs: list[GenerateJob], repeats: int,
                  conn: Connection) -> None:
    """Spawned: build the engine with the replica's device env; per job, warm up and time ``repeats`` runs."""
    os.environ.update(env)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vroll.engine.vllm_adapter import VLLMEngine

    engine = VLLMEngine(spec)

    def run(job: GenerateJob) -> int:
        return sum(len(c.token_ids) for r in engine.generate(job) for c in r.completions)

    out = []
    for job in jobs:
        run(job)
        out.append([timed(lambda job=job: run(job)) for _ in range(repeats)])
    conn.send(out)
    conn.close()


def bench_inproc(args: argparse.Namespace, ids: list[list[int]]) -> dict[str, dict[str, Any]]:
    spec, env = engine_spec(args)
    print(f"in-process engine: {spec.model} (env {env})", flush=True)
    counts = token_counts(args)
    jobs = [GenerateJob([PromptInput(p) for p in ids], sampling(args, m), 0) for m in counts.values()]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_inproc_child, args=(spec, env, jobs, args.repeats, child))
    proc.start()
    child.close()
    try:
        runs = parent.recv()
    except EOFError:
        runs = None
    proc.join()
    if runs is None:
        raise RuntimeError(f"in-process engine process failed (exit code {proc.exitcode}); see its output above")
    modes = {f"inproc{k}": summarize(f"inproc{k}", r) for k, r in zip(counts, runs, strict=True)}
    modes["inproc"]["spec"] = asdict(spec)
    return modes


def bench_server(args: argparse.Namespace, ids: list[list[int]], dp: int) -> dict[str, dict[str, Any]]:
    print(f"server DP={dp}:", flush=True)
    modes: dict[str, dict[str, Any]] = {}
    with running_server(serve_flags(args, dp)) as server, server.client(timeout=3600.0) as client:
        for suffix, max_tokens in token_counts(args).items():
            s = sampling(args, max_tokens)

            def run(s: SamplingSpec = s) -> int:
                out = client.generate(ids, s)
                return sum(len(c.token_ids) for c in out.flat())

            run()
            runs = [timed(run) for _ in range(args.repeats)]
            modes[f"server_dp{dp}{suffix}"] = {**summarize(f"server_dp{dp}{suffix}", runs), "dp": dp}
        if args.sync_repeats and dp == args.dp_list[0]:
            modes[f"server_dp{dp}"]["sync"] = time_gloo_sync(client, args.model, args.device, args.sync_repeats)
    return modes


def report(args: argparse.Namespace, modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Print the table and the two headline ratios; returns them."""
    inproc = modes.get("inproc")
    base = inproc["tokens_per_s"] if inproc else None

    def vs_inproc(m: dict[str, Any]) -> float | None:  # against the in-process run of the same length
        ref = modes.get("inproc_1tok" if m["mode"].endswith("_1tok") else "inproc")
        return m["tokens_per_s"] / ref["tokens_per_s"] if ref else None

    rows = [[m["mode"], m["tokens"], m["median_s"], m["tokens_per_s"], vs_inproc(m)] for m in modes.values()]
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
    one = [modes.get(k) for k in ("inproc_1tok", "server_dp1_1tok")]
    fixed_ms = (one[1]["median_s"] - one[0]["median_s"]) * 1e3 if all(one) else None
    if fixed_ms is not None:
        print(f"fixed cost of a server call (max_tokens=1, server_dp1 - inproc): {fixed_ms:+.1f} ms")
    return {"server_overhead_pct": overhead, "overhead_goal_pct": OVERHEAD_GOAL_PCT,
            "overhead_within_goal": None if overhead is None else overhead <= OVERHEAD_GOAL_PCT,
            "dp2_over_dp1": dp_ratio, "server_fixed_cost_ms": fixed_ms}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_at_start = os.getloadavg()
    ids = make_prompt_ids(args.model, args.prompts)
    modes: dict[str, dict[str, Any]] = {}
    if not args.skip_inproc:
        modes.update(bench_inproc(args, ids))
    for dp in args.dp_list:
        modes.update(bench_server(args, ids, dp))
    summary = report(args, modes)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    path = write_json(args.out, {"benchmark": NAME, "machine": machine_info(), "config": config,
                                 "model": model_meta(args.model), "load_avg_at_start": load_at_start,
                                 "modes": modes, **summary})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
