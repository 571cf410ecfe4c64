"""Does async generation (or dynamic sampling) change learning? The ``make demo`` recipe, scored the strict way.

Issue 15, item 4, and ``--dynamic_sampling``. One server; the base model is scored once (strict
greedy accuracy on the held-out split, ``vroll.demo.strict_accuracy``, 24 tokens); then each leg
trains the demo recipe against the server (4 prompts x 8 completions, 24 tokens, dapo, lr 2e-5,
correctness reward only, truncated completions masked, seed 0) and the weights it leaves on the
server are scored the same way. The legs differ only in ``--async_generation true --max_staleness K`` (leg ``async``) or
``--dynamic_sampling true`` (leg ``dynamic``; ``--max-generation-batches``). Like the async legs of
``grpo_step.py``, the server and the trainer run on their own cores (``--no-pin``: shared) or GPUs.

    python benchmarks/async_demo.py                                   # CPU, 50 steps per leg, ~40 min
    python benchmarks/async_demo.py --steps 50 --max-staleness 2 --legs sync,async
    python benchmarks/async_demo.py --legs sync,dynamic --no-pin      # the demo's own layout (shared cores)
    python benchmarks/async_demo.py --model /tmp/smollm2 --server-gpus 0 --trainer-gpus 1   # two GPUs

On one GPU the trainer refuses a server on its own GPU (TRL issue #2922 check), so a GPU run
needs two (``nvidia-h200-x2``). Writes ``benchmarks/results/async_demo.json`` and the eval files
(every reply) next to it in ``async_demo/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from _common import default_out, machine_info, print_table, running_server, write_json
from grpo_step import DEMO, _pinned, _split_cpus, async_serve_flags, gpu_envs, run_vroll


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="GRPO steps per leg (the demo's 50)")
    parser.add_argument("--legs", default="sync,async")
    parser.add_argument("--max-staleness", type=int, default=1)
    parser.add_argument("--max-generation-batches", type=int, default=4, help="leg dynamic")
    parser.add_argument("--test-size", type=int, default=200, help="held-out problems scored (the demo's 200)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the step-time means")
    parser.add_argument("--out", default=default_out("async_demo"))
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU: server and trainer on their own cores (default)")
    parser.add_argument("--server-cpus")
    parser.add_argument("--trainer-cpus")
    parser.add_argument("--server-gpus", help="CUDA_VISIBLE_DEVICES of the server")
    parser.add_argument("--trainer-gpus", help="CUDA_VISIBLE_DEVICES of the trainer")
    args = parser.parse_args()
    server_cpus, trainer_cpus = _split_cpus(args) if args.pin else (None, None)
    server_env, trainer_env = gpu_envs(args)
    evals = Path(args.out).with_suffix("")
    evals.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="vroll-async-demo-"))
    args.max_completion_length = DEMO["max_completion_length"]
    args.no_is_correction = False  # run_vroll's knob (grpo_step.py): the demo keeps the correction on
    args.reward = "addition"  # run_vroll's knob too: the demo task's own reward
    with _pinned(server_cpus), running_server(async_serve_flags(args), server_env) as server:
        client, tokenizer = server.client(), _tokenizer(args.model)
        result: dict = {"before": _score(client, tokenizer, args, evals, "before"), "legs": {}}
        for name in args.legs.split(","):
            extra = ["--vllm_server_base_url", server.url, "--mask_truncated_completions", "true"]
            if name == "async":
                extra += ["--async_generation", "true", "--max_staleness", str(args.max_staleness)]
            if name == "dynamic":
                extra += ["--dynamic_sampling", "true", "--max_generation_batches", str(args.max_generation_batches)]
            leg = run_vroll(name, extra, args, tmp, trainer_cpus, trainer_env)
            metrics = [json.loads(line) for line in (tmp / name / "metrics.jsonl").open()]
            rewards = [m["reward/mean"] for m in metrics]
            result["legs"][name] = {**asdict(leg), "ratio": leg.ratio, "reward_per_step": rewards,
                                    "wall_s": sum(m["time/step_s"] for m in metrics),
                                    "generations": sum(m.get("dynamic/generations", 1.0) for m in metrics),
                                    "after": _score(client, tokenizer, args, evals, f"after_{name}")}
    report(result, args)
    return 0


def _tokenizer(model: str):  # noqa: ANN202
    from transformers import AutoTokenizer

    from vroll.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def _score(client, tokenizer, args: argparse.Namespace, evals: Path, name: str) -> dict:  # noqa: ANN001
    from vroll.demo import strict_accuracy

    res = strict_accuracy(client, tokenizer, args.test_size, evals, name)
    return {"accuracy": res.accuracy, "truncated_frac": res.truncated_frac}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def report(result: dict, args: argparse.Namespace) -> None:
    before = result["before"]["accuracy"]
    rows = [[name, leg["after"]["accuracy"], leg["after"]["accuracy"] - before, leg["after"]["truncated_frac"],
             leg["step_s"], leg["wall_s"], leg["generations"], leg.get("staleness_mean"),
             _mean(leg["reward_per_step"][-10:])] for name, leg in result["legs"].items()]
    print(f"\nbase model: strict accuracy {before:.3f} on {args.test_size} held-out problems")
    print_table(["leg", "accuracy", "gain", "truncated", "s/step", "steps' s", "generations", "staleness",
                 "reward (last 10)"], rows,
                title=f"demo recipe, {args.steps} steps each (max_staleness {args.max_staleness} for async)")
    legs = result["legs"]
    if {"sync", "async"} <= set(legs):
        result["async_minus_sync_accuracy"] = legs["async"]["after"]["accuracy"] - legs["sync"]["after"]["accuracy"]
        print(f"async - sync: {100 * result['async_minus_sync_accuracy']:+.1f} points of strict accuracy")
    data = {"machine": machine_info(), "config": DEMO | {"mask_truncated_completions": True}, "model": args.model,
            "steps": args.steps, "max_staleness": args.max_staleness,
            "max_generation_batches": args.max_generation_batches, "test_size": args.test_size, **result}
    print(f"wrote {write_json(args.out, data)} (every reply in {Path(args.out).with_suffix('')})")


if __name__ == "__main__":
    sys.exit(main())
