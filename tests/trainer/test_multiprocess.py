"""GRPO under ``accelerate launch --multi_gpu --num_processes 2`` on CPU (DDP over gloo),
against a server and with a colocated engine in each process.

Only rank 0 talks to the server; each rank trains on its half of the completions.
With the same global batch and seeds, the first step must match a one-process run
that accumulates the two halves: same prompts, same completions (the server samples
them with per-prompt seeds), same rewards, and the same gradient up to float noise
(DDP's mean of the two halves against one process's accumulation), so the second
step starts from the same weights too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def grpo_flags(served, out, accumulation: int) -> list[str]:
    """On the shared tiny model (the check is rank arithmetic, not learning), with its vowel-share reward,
    which differs between almost any two completions: advantages and gradients are never all zero."""
    return ["grpo", "--vllm_server_base_url", served.url, "--model_name_or_path", served.model,
            "--reward_funcs", "vowel_share", "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", str(accumulation), "--num_generations", "4",
            "--max_completion_length", "8", "--dataset_size", "64", "--seed", "3", "--learning_rate", "1e-5",
            "--save_final_model", "false", "--save_only_model", "true", "--output_dir", str(out)]


def run(cmd: list[str]) -> list[dict]:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_metrics(cmd[cmd.index("--output_dir") + 1])


LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vroll"]
# On a machine without GPUs, accelerate starts several processes only with --multi_gpu (torchrun).


@pytest.fixture(scope="module")
def one_process(tiny_served, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("one")
    rows = run([sys.executable, "-m", "vroll", *grpo_flags(tiny_served, out, 2)])
    assert all(r["grad_norm"] > 0 for r in rows)  # the comparisons below have teeth
    return rows


def same_run(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("reward/mean", "reward/std", "completion/mean_length", "advantage/abs_mean"):
            assert a[key] == b[key], key  # the same completions, scored the same
        for key in ("loss", "grad_norm"):  # rank-averaged loss, DDP-averaged gradient
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_served, one_process, tmp_path):
    two = run([*LAUNCH_2, *grpo_flags(tiny_served, tmp_path, 1)])
    same_run(one_process, two)
    assert two[0]["weight_version"] < two[1]["weight_version"]  # rank 0 pushed the weights after step 1


def test_two_colocated_engines_sample_what_the_server_samples(tiny_served, one_process, tmp_path):
    """Colocate with 2 processes and ``--vllm_seed_per_prompt``: each rank's engine generates its own
    prompts, seeded by their global index, so the run equals the one-process server run (the
    default, one seed per batch, samples differently once the batch is split)."""
    flags = grpo_flags(tiny_served, tmp_path, 1)
    flags[flags.index("--vllm_server_base_url") : flags.index("--vllm_server_base_url") + 2] = [
        "--vllm_mode", "colocate", "--vllm_enforce_eager", "true", "--vllm_kv_cache_memory_gib", "0.5",
        "--vllm_seed_per_prompt", "true"]
    same_run(one_process, run([*LAUNCH_2, *flags]))


def test_colocate_tensor_parallel_engine_spans_two_processes(tiny_model, tmp_path):
    """--vllm_tensor_parallel_size 2: the two ranks form one engine (each feeds it its prompts
    and keeps its completions) and every sync reaches both shards. The embedded model's 9
    attention heads do not split in two; the tiny model's do."""
    flags = ["grpo", "--model_name_or_path", tiny_model, "--vllm_mode", "colocate", "--vllm_tensor_parallel_size", "2",
             "--vllm_enforce_eager", "true", "--vllm_kv_cache_memory_gib", "0.5", "--max_steps", "2",
             "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
             "--dataset_size", "64", "--seed", "3", "--save_final_model", "false", "--save_only_model", "true",
             "--output_dir", str(tmp_path / "run")]
    rows = run([*LAUNCH_2, *flags])
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["weight_version"] for r in rows] == [1.0, 2.0]  # loaded into the TP engine before each generation
    assert all(r["completion/mean_length"] > 0 for r in rows)
