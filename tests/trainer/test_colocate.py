"""Colocate mode on CPU: the in-process engine tracks the trainer's weights, and it learns.

The colocated engine joins a ``torch.distributed`` world and binds threads, so each
run is its own process (``colocate_probe.py``, or the ``vroll`` command line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_metrics

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
STEPS = 8


@pytest.fixture(scope="module")
def grpo_probe(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("colocate")
    proc = subprocess.run([sys.executable, str(HERE / "colocate_probe.py"), "--out", str(out), "--steps", str(STEPS),
                           "--lr", "5e-5"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "probe.json").read_text())


def test_engine_weights_equal_the_trainers_after_every_step(grpo_probe):
    _, records = grpo_probe
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # The engine vs the trainer's weights as pushed (rounded to bf16): compute rounding only, 0.01-0.05 nats a
    # token on average. It grows where training sharpened the policy and its greedy path passes a near-tie (one
    # run: 0.105 at step 8, with the initial weights 4.6 away), so the bound is 0.1 or a twentieth of the
    # distance to the initial weights, whichever is larger; an engine left on old weights is that whole distance off.
    for r in records:
        assert r["err_vs_trainer"] < max(0.1, 0.05 * r["err_vs_initial"]), r
    # ...and far closer to the trained weights than to the initial ones, wherever training moved the
    # policy well past rounding level (twice the 0.05 above: step 1 of one run moved 0.073, against a rounding
    # error of 0.045, so the halving below cannot show there).
    moved = [r for r in records if r["err_vs_initial"] > 0.1]
    assert len(moved) >= STEPS // 2, records
    for r in moved:
        assert r["err_vs_trainer"] < 0.5 * r["err_vs_initial"], r
    assert records[-1]["trainer_moved"] > 0.2  # the check has teeth: training moved the logprobs
    versions = [r["engine_version"] for r in records]
    assert versions == list(range(versions[0], versions[0] + STEPS))  # one load per step


def test_colocated_sampling_is_seeded_per_batch_and_leaves_the_trainers_rng_alone(grpo_probe):
    """One seed per generation batch (not vLLM's per-request generators, a loop per decode step): the
    same batch and seed give the same completions, another seed others, and the trainer's own random
    stream (dropout, data order) does not move with the engine's sampling."""
    out, _ = grpo_probe
    check = json.loads((out / "sampling.json").read_text())
    assert check["first"] == check["again"]
    assert check["other_seed"] != check["first"]  # the control: the seed is what fixes them
    assert len({tuple(c) for c in check["first"]}) > 1  # temperature 1: the 8 completions differ
    assert check["rng_untouched"]


def test_seed_per_prompt_makes_a_split_batch_sample_what_the_whole_batch_samples(grpo_probe):
    """``--vllm_seed_per_prompt``: prompt i's completions depend on seed + i alone (as on a server), so
    generating it alone gives what it got within the batch; with one seed per batch they differ."""
    out, _ = grpo_probe
    check = json.loads((out / "sampling.json").read_text())
    assert check["split_alike_per_prompt"]
    assert not check["split_alike_per_batch"]  # the control: the default does depend on the batch


def test_colocate_reward_goes_up(grpo_probe):
    _, records = grpo_probe
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards


def test_colocate_run_writes_the_usual_artifacts(grpo_probe):
    out, _ = grpo_probe
    rows = read_metrics(out)
    assert len(rows) == STEPS
    assert rows[0]["time/sync_s"] > 0  # later syncs run in the probe callback
    assert (out / "reward_curve.png").exists() and (out / f"checkpoint-{STEPS}").is_dir()


def test_online_dpo_colocate_from_the_command_line(tmp_path):
    cmd = [sys.executable, "-m", "vroll", "online-dpo", "--vllm_mode", "colocate", "--vllm_enforce_eager", "true",
           "--vllm_kv_cache_memory_gib", "1", "--max_steps", "2", "--per_device_train_batch_size", "4",
           "--max_completion_length", "8", "--dataset_size", "32", "--learning_rate", "1e-5",
           "--output_dir", str(tmp_path), "--save_final_model", "false", "--save_only_model", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert {"dpo/margin", "pairs/tied_frac", "weight_version"} <= set(rows[-1])
    assert rows[-1]["weight_version"] == 2.0  # pushed before each generation


def test_grpo_colocate_runs_multi_turn_episodes(tmp_path):
    """``--environment`` with the in-process engine: the same episode driver as against a server, each turn
    one call to the colocated engine, its sampling logprobs used for the importance-sampling correction."""
    cmd = [sys.executable, "-m", "vroll", "grpo", "--vllm_mode", "colocate", "--vllm_enforce_eager", "true",
           "--vllm_kv_cache_memory_gib", "1", "--environment", "test_environments:Nudge", "--max_turns", "3",
           "--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2",
           "--max_completion_length", "160", "--temperature", "0.5", "--dataset_size", "16",
           "--output_dir", str(tmp_path), "--save_final_model", "false", "--save_only_model", "true"]
    path = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])  # Nudge, its helpers
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    # Nudge answers twice before it ends an episode: three replies unless the budget ran out first
    assert all(r["env/turns_mean"] >= 2 and 0 < r["env/model_token_frac"] < 1 and r["env/errors"] == 0 for r in rows)
    assert "is/is_ratio_mean" in rows[0]  # the colocated engine's logprobs, per model token, were used
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert any(s["turns"] == 3 and "Check 2: are you sure?" in json.dumps(s["conversation"]) for s in samples)
