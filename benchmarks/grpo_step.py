"""Seconds per GRPO step on the demo config (``make demo``): vroll's generation modes against TRL.

Legs, one after the other, same config, model and seed: ``server`` (``vroll grpo`` against
``vroll serve``), ``colocate`` (vLLM inside the trainer), ``plain`` (``--use_vllm false``),
``trl`` (TRL's ``GRPOTrainer`` without vLLM; ``pip install trl``), ``trl-colocate`` (GPU only).
Means leave out the first ``--warmup`` steps; ``overhead`` is the share of a step that is neither
generating nor training. On a GPU, ``--model`` is a folder (``benchmarks/gpu/make_model.py``) and
the server leg needs a second GPU.

    python benchmarks/grpo_step.py                     # all legs, 6 steps each
    python benchmarks/grpo_step.py --legs server,trl --steps 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import cuda_available, default_out, machine_info, print_table, running_server, write_json

DEMO = dict(per_device_train_batch_size=32, num_generations=8, max_completion_length=24, learning_rate=2e-5,
            temperature=1.0, loss_type="dapo", seed=0)
SERVE_FLAGS = ["--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-gib", "1"]


@dataclass
class Leg:
    name: str
    step_s: float
    generate_s: float | None
    train_s: float | None
    sync_s: float | None
    score_s: float | None
    overhead_frac: float | None
    reward_mean: float
    steps: int


def _vroll_flags(out: Path, steps: int, model: str) -> list[str]:
    flags = ["grpo", "--output_dir", str(out), "--max_steps", str(steps), "--dataset_size", "2000",
             "--model_name_or_path", model,
             "--reward_funcs", "addition_correct", "addition_format", "--reward_weights", "1.0", "0.0",
             "--save_final_model", "false", "--save_only_model", "true"]
    for key, value in DEMO.items():
        flags += [f"--{key}", str(value)]
    return flags


def _leg_from_metrics(name: str, path: Path, warmup: int) -> Leg:
    rows = [json.loads(line) for line in path.read_text().splitlines()][warmup:]

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    step, gen, train = mean("time/step_s"), mean("time/generate_s"), mean("time/train_s")
    return Leg(name, step, gen, train, mean("time/sync_s"), mean("time/score_s"), (step - gen - train) / step,
               mean("reward/mean"), len(rows))


def run_vroll(name: str, extra: list[str], args: argparse.Namespace, tmp: Path) -> Leg:
    out = tmp / name
    cmd = [sys.executable, "-m", "vroll", *_vroll_flags(out, args.steps, args.model), *extra]
    print(f"  {name}: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} leg failed:\n{proc.stderr[-3000:]}")
    return _leg_from_metrics(name, out / "metrics.jsonl", args.warmup)


def run_trl(name: str, args: argparse.Namespace, tmp: Path) -> Leg:
    from _trl import run_trl_grpo

    from vroll.models import resolve_model
    from vroll.tasks.addition import addition_splits

    colocate = name == "trl-colocate"
    print(f"  {name}: GRPOTrainer(use_vllm={colocate})", flush=True)
    rows = addition_splits(seed=0, train_size=2000, test_size=0)[0]
    steps, warmup = args.steps, args.warmup
    t = run_trl_grpo(resolve_model(args.model), rows, steps, prompts_per_step=4, output_dir=str(tmp / name),
                     colocate=colocate,
                     **{k: v for k, v in DEMO.items() if k not in ("per_device_train_batch_size",)})
    step = sum(t.step_s[warmup:]) / len(t.step_s[warmup:])
    gen = sum(t.generate_s[warmup:]) / len(t.generate_s[warmup:]) if t.generate_s else None
    return Leg(name, step, gen, None, None, None, None, sum(t.reward_mean[warmup:]) / len(t.reward_mean[warmup:]),
               len(t.step_s[warmup:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--legs", default="server,colocate,plain,trl")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the means")
    parser.add_argument("--out", default=default_out("grpo_step"))
    parser.add_argument("--model", default="smollm2-135m", help="the embedded model, or a folder")
    parser.add_argument("--max-completion-length", type=int, default=DEMO["max_completion_length"])
    args = parser.parse_args()
    DEMO["max_completion_length"] = args.max_completion_length
    legs_wanted = args.legs.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="vroll-bench-grpo-"))
    legs: list[Leg] = []
    if "server" in legs_wanted:
        with running_server(SERVE_FLAGS) as server:
            legs.append(run_vroll("server", ["--vllm_server_base_url", server.url], args, tmp))
    if "colocate" in legs_wanted:
        colocate = ["--vllm_mode", "colocate"] + (
            ["--vllm_gpu_memory_utilization", "0.3"] if cuda_available() else
            ["--vllm_enforce_eager", "true", "--vllm_kv_cache_memory_gib", "1"])
        legs.append(run_vroll("colocate", colocate, args, tmp))
    if "plain" in legs_wanted:
        legs.append(run_vroll("plain", ["--use_vllm", "false"], args, tmp))
    for name in ("trl", "trl-colocate"):
        if name in legs_wanted:
            legs.append(run_trl(name, args, tmp))
    report(legs, args)
    return 0


def report(legs: list[Leg], args: argparse.Namespace) -> None:
    trl = next((leg for leg in legs if leg.name == "trl"), None)  # ratios against TRL without vLLM
    rows = [[leg.name, leg.step_s, leg.generate_s, leg.train_s, leg.sync_s, leg.score_s,
             None if leg.overhead_frac is None else f"{100 * leg.overhead_frac:.1f}%",
             None if trl is None else trl.step_s / leg.step_s, leg.reward_mean] for leg in legs]
    print_table(["leg", "s/step", "generate", "train", "sync", "score", "overhead", "x TRL", "reward"], rows,
                title=f"GRPO step on the demo config (mean of steps {args.warmup + 1}..{args.steps})")
    data = {"machine": machine_info(), "config": DEMO, "model": args.model, "steps": args.steps, "warmup": args.warmup,
            "legs": [asdict(leg) for leg in legs],
            "speedup_vs_trl": {leg.name: trl.step_s / leg.step_s for leg in legs} if trl else None}
    print(f"\nwrote {write_json(args.out, data)}")


if __name__ == "__main__":
    sys.exit(main())
