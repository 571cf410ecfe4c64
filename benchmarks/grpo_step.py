"""Seconds per GRPO step on the demo config (``make demo``): vroll's generation modes against TRL.

Legs, one after the other, same config, model and seed: ``server`` (``vroll grpo`` against
``vroll serve``), ``colocate`` (vLLM inside the trainer), ``plain`` (``--use_vllm false``),
``trl`` (TRL's ``GRPOTrainer`` without vLLM; ``pip install trl``), ``trl-colocate`` (GPU only).
``--no-is-correction`` runs every leg without the importance-sampling correction.
Means leave out the first ``--warmup`` steps; ``overhead`` is the share of a step that is neither
generating nor training. On a GPU, ``--model`` is a folder (``benchmarks/gpu/make_model.py``) and
the server leg needs a second GPU.

Async legs (issue 15): ``server-sync`` and ``server-async`` run against one server with the server
and the trainer on their own cores (``--server-cpus`` / ``--trainer-cpus``, default: the first and
the second half of this process's cores; on GPUs ``--server-gpus`` / ``--trainer-gpus``), the
second with ``--async_generation true --max_staleness K``. Each reports generate, train, the
trainer's wait, the generator's idle fraction and ``ratio`` = step / max(generate, train) (goal for
async: <= 1.15; sync is ~ (generate + train + sync) / max).

    python benchmarks/grpo_step.py                     # all legs, 6 steps each
    python benchmarks/grpo_step.py --legs server,trl --steps 4
    python benchmarks/grpo_step.py --legs server-sync,server-async --steps 8 \
        --out benchmarks/results/grpo_step_async.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
    wait_s: float | None = None  # async: the trainer waiting for the generator
    generator_idle_frac: float | None = None  # async: share of the step with no generation request in flight
    staleness_mean: float | None = None

    @property
    def ratio(self) -> float | None:
        """Step over the slower of the two sides: 1.0 is perfect overlap."""
        if self.generate_s is None or self.train_s is None:
            return None
        return self.step_s / max(self.generate_s, self.train_s)


def _vroll_flags(out: Path, steps: int, model: str, reward: str = "addition") -> list[str]:
    rewards = (["--reward_funcs", "vowel_share"] if reward == "vowels" else
               ["--reward_funcs", "addition_correct", "addition_format", "--reward_weights", "1.0", "0.0"])
    flags = ["grpo", "--output_dir", str(out), "--max_steps", str(steps), "--dataset_size", "2000",
             "--model_name_or_path", model, *rewards, "--save_final_model", "false", "--save_only_model", "true"]
    for key, value in DEMO.items():
        flags += [f"--{key}", str(value)]
    return flags


def _leg_from_metrics(name: str, path: Path, warmup: int) -> Leg:
    rows = [json.loads(line) for line in path.read_text().splitlines()][warmup:]

    def mean(key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows) / len(rows)

    def maybe(key: str) -> float | None:
        return mean(key) if key in rows[-1] else None

    step, gen, train = mean("time/step_s"), mean("time/generate_s"), mean("time/train_s")
    overlapped = "async/staleness_mean" in rows[-1]  # async: generation is off the step's clock
    return Leg(name, step, gen, train, mean("time/sync_s"), mean("time/score_s"),
               (step - train - (0 if overlapped else gen) - (maybe("time/trainer_wait_s") or 0)) / step,
               mean("reward/mean"), len(rows), maybe("time/trainer_wait_s"), maybe("async/generator_idle_frac"),
               maybe("async/staleness_mean"))


def run_vroll(name: str, extra: list[str], args: argparse.Namespace, tmp: Path,
              cpus: set[int] | None = None, env: dict[str, str] | None = None) -> Leg:
    """One ``vroll grpo`` leg in a subprocess (on ``cpus`` when given, with ``env`` added)."""
    out = tmp / name
    cmd = [sys.executable, "-m", "vroll", *_vroll_flags(out, args.steps, args.model, args.reward), *extra]
    if args.no_is_correction:
        cmd += ["--vllm_importance_sampling_correction", "false"]
    print(f"  {name}: {' '.join(cmd[2:])}" + (f" (trainer on cores {sorted(cpus)})" if cpus else ""), flush=True)
    env = {**os.environ, **(env or {})} | ({"OMP_NUM_THREADS": str(len(cpus))} if cpus else {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)  # noqa: PLW1509
    if proc.returncode != 0:
        raise RuntimeError(f"{name} leg failed:\n{proc.stderr[-3000:]}")
    return _leg_from_metrics(name, out / "metrics.jsonl", args.warmup)


@contextmanager
def _pinned(cpus: set[int] | None) -> Iterator[None]:
    """This process (and what it starts meanwhile) on ``cpus``; the previous affinity afterwards."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _split_cpus(args: argparse.Namespace) -> tuple[set[int] | None, set[int] | None]:
    """The server's and the trainer's cores: as given, else the two halves of ours (none on GPUs)."""
    if args.server_gpus or cuda_available():
        return None, None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("the async legs need two cores at least (one for the server, one for the trainer)")
    half = len(cores) // 2
    server = _cores(args.server_cpus) if args.server_cpus else set(cores[:half])
    trainer = _cores(args.trainer_cpus) if args.trainer_cpus else set(cores[half:])
    return server, trainer


def _cores(text: str) -> set[int]:
    """``0,2-3`` -> {0, 2, 3}"""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def async_serve_flags(args: argparse.Namespace) -> list[str]:
    """The async legs' server: ``--model``, a context for the completions, CPU or GPU memory knobs."""
    flags = ["--model", args.model, "--max-model-len", str(max(512, args.max_completion_length + 256))]
    if args.server_gpus or cuda_available():
        return [*flags, "--gpu-memory-utilization", "0.5"]
    return [*flags, "--enforce-eager", "--kv-cache-memory-gib", "1"]


def gpu_envs(args: argparse.Namespace) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """The server's and the trainer's CUDA_VISIBLE_DEVICES from --server-gpus / --trainer-gpus (None: inherit).

    ``--trainer-gpus ""``: the trainer on the CPU beside a GPU server (weights over gloo); one GPU suffices.
    """
    def env(gpus: str | None) -> dict[str, str] | None:
        return {"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else None

    return env(args.server_gpus), env(args.trainer_gpus)


def run_async_legs(wanted: list[str], args: argparse.Namespace, tmp: Path) -> list[Leg]:
    """Server mode synchronous and asynchronous, against one server, each side on its own cores or GPUs."""
    server_cpus, trainer_cpus = _split_cpus(args)
    server_env, trainer_env = gpu_envs(args)
    if server_cpus:
        print(f"  server on cores {sorted(server_cpus)}, trainer on cores {sorted(trainer_cpus)}", flush=True)
    legs = []
    with _pinned(server_cpus), running_server(async_serve_flags(args), server_env) as server:
        pass_through = ["--vllm_server_base_url", server.url]
        modes = {"server-sync": [], "server-async": ["--async_generation", "true",
                                                     "--max_staleness", str(args.max_staleness)]}
        for name, flags in modes.items():
            if name in wanted:
                legs.append(run_vroll(name, pass_through + flags, args, tmp, trainer_cpus, trainer_env))
    return legs


def run_trl(name: str, args: argparse.Namespace, tmp: Path) -> Leg:
    from _trl import run_trl_grpo

    from vroll.models import resolve_model
    from vroll.tasks.addition import addition_splits

    colocate = name == "trl-colocate"
    print(f"  {name}: GRPOTrainer(use_vllm={colocate})", flush=True)
    rows = addition_splits(seed=0, train_size=2000, test_size=0)[0]
    steps, warmup = args.steps, args.warmup
    t = run_trl_grpo(resolve_model(args.model), rows, steps, prompts_per_step=4, output_dir=str(tmp / name),
                     colocate=colocate, is_correction=not args.no_is_correction, reward=args.reward,
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
    parser.add_argument("--max-staleness", type=int, default=1, help="server-async: --max_staleness")
    parser.add_argument("--no-is-correction", action="store_true",
                        help="every leg without the importance-sampling correction (vroll then asks vLLM for no "
                             "logprobs; TRL asks for them anyway)")
    parser.add_argument("--reward", choices=["addition", "vowels"], default="addition",
                        help="vowels: a reward random completions differ in (random-weight models: the addition "
                             "reward is always 0 there, so vroll would train no row and TRL every row)")
    parser.add_argument("--server-cpus", help="server-sync/-async: the server's cores, e.g. 0 (default: first half)")
    parser.add_argument("--trainer-cpus", help="server-sync/-async: the trainer's cores (default: second half)")
    parser.add_argument("--server-gpus", help="server-sync/-async on GPUs: CUDA_VISIBLE_DEVICES of the server")
    parser.add_argument("--trainer-gpus", help="server-sync/-async on GPUs: CUDA_VISIBLE_DEVICES of the trainer")
    args = parser.parse_args()
    DEMO["max_completion_length"] = args.max_completion_length
    legs_wanted = args.legs.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="vroll-bench-grpo-"))
    legs: list[Leg] = []
    if "server" in legs_wanted:
        with running_server(SERVE_FLAGS) as server:
            legs.append(run_vroll("server", ["--vllm_server_base_url", server.url], args, tmp))
    if {"server-sync", "server-async"} & set(legs_wanted):
        legs += run_async_legs(legs_wanted, args, tmp)
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
    trl_col = next((leg for leg in legs if leg.name == "trl-colocate"), None)  # ...and with vLLM colocated
    rows = [[leg.name, leg.step_s, leg.generate_s, leg.train_s, leg.sync_s, leg.score_s,
             None if leg.overhead_frac is None else f"{100 * leg.overhead_frac:.1f}%",
             None if trl is None else trl.step_s / leg.step_s, None if trl_col is None else trl_col.step_s / leg.step_s,
             leg.reward_mean] for leg in legs]
    print_table(["leg", "s/step", "generate", "train", "sync", "score", "overhead", "x TRL", "x TRL colocate",
                 "reward"], rows, title=f"GRPO step on the demo config (mean of steps {args.warmup + 1}..{args.steps})")
    data = {"machine": machine_info(), "config": DEMO, "is_correction": not args.no_is_correction,
            "model": args.model, "steps": args.steps, "warmup": args.warmup,
            "legs": [asdict(leg) | {"ratio": leg.ratio} for leg in legs],
            "speedup_vs_trl": {leg.name: trl.step_s / leg.step_s for leg in legs} if trl else None,
            "speedup_vs_trl_colocate": {leg.name: trl_col.step_s / leg.step_s for leg in legs} if trl_col else None}
    data["async"] = report_async(legs, args)
    print(f"\nwrote {write_json(args.out, data)}")


def report_async(legs: list[Leg], args: argparse.Namespace) -> dict | None:
    """The async legs' table; the ratio against the goal and the speedup over the synchronous leg."""
    pair = {leg.name: leg for leg in legs if leg.name in ("server-sync", "server-async")}
    if not pair:
        return None
    rows = [[leg.name, leg.step_s, leg.generate_s, leg.train_s, leg.sync_s, leg.wait_s,
             leg.generator_idle_frac, leg.staleness_mean, leg.ratio] for leg in pair.values()]
    print_table(["leg", "s/step", "generate", "train", "sync", "trainer wait", "gen idle", "staleness",
                 "step/max(gen,train)"], rows, title="server mode, server and trainer on their own cores/GPUs")
    out: dict = {"max_staleness": args.max_staleness, "goal_ratio": 1.15}
    if "server-async" in pair:
        out["async_ratio"] = pair["server-async"].ratio
        out["goal_met"] = out["async_ratio"] <= 1.15
    if len(pair) == 2:
        out["speedup_async_vs_sync"] = pair["server-sync"].step_s / pair["server-async"].step_s
        print(f"async vs sync: {out['speedup_async_vs_sync']:.2f}x per step; "
              f"async step / max(generate, train) = {out['async_ratio']:.3f} (goal <= 1.15)")
    return out


if __name__ == "__main__":
    sys.exit(main())
