"""Async generation (``--async_generation true --max_staleness K``) against a real server.

The schedule is deterministic (``vroll.generation.async_generation``): with one generation per
step, batch g is sampled with the weights pushed before batch g - K, so step 1 trains on
fresh samples and every later step on samples exactly K pushes old.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import read_metrics
from vroll.generation.async_generation import Schedule
from vroll.tasks.addition import addition_splits
from vroll.trainer.bookkeeping.state import from_state, type_table
from vroll.trainer.config import GRPOConfig, OnlineDPOConfig
from vroll.trainer.generators import async_schedule
from vroll.trainer.grpo import GRPOTrainer
from vroll.trainer.online_dpo import OnlineDPOTrainer

ROWS = addition_splits(seed=1, train_size=64, test_size=0)[0]
ASYNC_KEYS = ("async/staleness_mean", "async/staleness_max", "async/dropped_samples", "async/dropped_samples_total",
              "async/generator_idle_frac", "async/ready_batches", "time/trainer_wait_s", "time/generate_s")
IS_KEYS = ("is/is_ratio_mean", "is/is_ratio_min", "is/is_ratio_max", "is/is_clipped_frac")


def config(server, out, **kw) -> GRPOConfig:
    """On the tiny model ``server_tiny`` serves: these tests check versions, staleness and resume, not
    learning, and its vowel-share reward varies between any two completions, so advantages and
    gradients are never all zero (the addition reward would be 0 for every random completion)."""
    base = dict(output_dir=str(out), vllm_server_base_url=server.url, model_name_or_path=server.model,
                reward_funcs=["vowel_share"], max_steps=3, per_device_train_batch_size=8,
                num_generations=4, max_completion_length=8, learning_rate=1e-5, seed=3, logging_steps=1,
                save_only_model=True, save_final_model=False, async_generation=True, max_staleness=1)
    return GRPOConfig(**(base | kw))


def samples_by_step(out) -> dict[int, set[int]]:
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {s: {r["weight_version"] for r in rows if r["step"] == s} for s in sorted({r["step"] for r in rows})}


# ---------------------------------------------------------------- the schedule, without a server


@pytest.mark.parametrize(("micro_per_gen", "accumulation"), [(1, 1), (2, 1), (3, 2), (1, 4), (2, 4), (3, 4)])
@pytest.mark.parametrize("lag", [1, 2, 3])
def test_schedule_keeps_staleness_within_k_and_never_deadlocks(micro_per_gen, accumulation, lag):
    """Replay the trainer's loop (push at a boundary when a step happened since the last push) and
    check what the schedule hands out: every batch is handed out by the time it is needed, it was
    sampled at most ``lag`` pushes ago, and in the steady state exactly ``lag``."""
    steps = 12
    total = -(-steps * accumulation // micro_per_gen)
    schedule = Schedule(lag, micro_per_gen, accumulation, total)
    pushes, handed, sampled_at, dirty, staleness = 0, 0, {}, True, []
    for micro in range(steps * accumulation):
        if micro % micro_per_gen == 0:
            g = micro // micro_per_gen
            if dirty:
                pushes, dirty = pushes + 1, False
                while schedule.allowed(handed, pushes):
                    sampled_at[handed], handed = pushes, handed + 1
            assert pushes == schedule.push_before(g)  # the closed form is the loop's own count
            assert g < handed, f"batch {g} needed but not handed out"
            staleness.append(pushes - sampled_at[g])
        if (micro + 1) % accumulation == 0:
            dirty = True
    assert handed == total and max(staleness) == lag
    assert staleness[-1] == lag and min(staleness) == 0  # the first batch is fresh


def test_async_mode_decides_and_warns_in_colocate(tmp_path, caplog):
    assert async_schedule(GRPOConfig(output_dir=str(tmp_path)), 10) is None
    assert async_schedule(GRPOConfig(output_dir=str(tmp_path), async_generation=True), 10) == Schedule(1, 1, 1, 10)
    with caplog.at_level(logging.WARNING):
        assert async_schedule(GRPOConfig(output_dir=str(tmp_path), async_generation=True, vllm_mode="colocate"),
                              10) is None
    [record] = [r for r in caplog.records if "async_generation" in r.getMessage()]
    assert "running synchronously" in record.getMessage() and "\n" not in record.getMessage()


@pytest.mark.parametrize(("kw", "message"), [
    (dict(max_staleness=0), "max_staleness must be >= 1"),
    (dict(async_generation=True, use_vllm=False), "async_generation overlaps a vroll server's generation"),
    (dict(async_generation=True, vllm_importance_sampling_correction=False),
     "it needs vllm_importance_sampling_correction"),
])
def test_bad_async_config_is_a_clear_error(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(output_dir=str(tmp_path), **kw)


def test_bad_async_flag_on_the_command_line(tmp_path, capsys):
    from vroll.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["grpo", "--output_dir", str(tmp_path), "--async_generation", "true", "--max_staleness", "0"])
    assert exc.value.code == 2 and "max_staleness must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------- against a server


@pytest.fixture
def server(tiny_served):
    return tiny_served


@pytest.mark.slow
def test_async_grpo_samples_carry_versions_and_staleness_stays_within_k(server, tmp_path):
    version = server.client().info().weight_version
    GRPOTrainer(args=config(server, tmp_path), train_dataset=ROWS).train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ASYNC_KEYS + IS_KEYS:
        assert key in rows[-1], key
    # step 1: the batch sampled right after the first push; then always one push old (K = 1)
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["async/dropped_samples_total"] == 0 for r in rows)
    assert all(0.0 <= r["async/generator_idle_frac"] <= 1.0 for r in rows)
    first = version + 1  # the server's version after the trainer's first push
    assert samples_by_step(tmp_path) == {1: {first}, 2: {first}, 3: {first + 1}}
    assert [r["weight_version"] for r in rows] == [first, first, first + 1]
    assert all(r["is/is_ratio_min"] <= r["is/is_ratio_mean"] <= r["is/is_ratio_max"] for r in rows)
    # pushes: before generating, after steps 1 and 2 (each once the generator is idle), and the final one
    assert server.client().info().weight_version == version + 4


@pytest.mark.slow
@pytest.mark.parametrize("drop", [True, False])
def test_samples_older_than_k_are_dropped_and_the_control_sees_them(server, tmp_path, drop):
    """The generator forced to run 2 pushes behind with K = 1: with the drop, the stale batch is
    counted and generated again (the loss never sees staleness > 1); without it (the negative
    control) staleness 2 reaches the loss."""
    trainer = GRPOTrainer(args=config(server, tmp_path), train_dataset=ROWS)
    ahead = trainer.rollouts.ahead
    ahead.schedule = Schedule(2, 1, 1, ahead.schedule.total)
    if not drop:
        ahead.max_staleness = 99
    trainer.train()
    rows = read_metrics(tmp_path)
    staleness = [r["async/staleness_max"] for r in rows]
    dropped = [r["async/dropped_samples"] for r in rows]
    if drop:
        assert staleness == [0.0, 1.0, 0.0] and dropped == [0.0, 0.0, 8.0]
        assert rows[-1]["async/dropped_samples_total"] == 8.0
    else:
        assert staleness == [0.0, 1.0, 2.0] and dropped == [0.0] * 3


@pytest.mark.slow
def test_async_checkpoint_keeps_the_batches_ahead_and_resume_is_exact(server, tmp_path):
    """A checkpoint waits for the batch in flight and stores it; resuming trains on it (and on what
    is generated next) exactly as the uninterrupted run did. A synchronous resume of the same
    checkpoint starts at the first prompts not trained on."""
    full, part, sync = tmp_path / "full", tmp_path / "part", tmp_path / "sync"
    kw = dict(max_steps=4, save_steps=2, save_only_model=False)
    GRPOTrainer(args=config(server, full, **kw), train_dataset=ROWS).train()
    raw = torch.load(full / "checkpoint-2/rng.pt", weights_only=False)["async"]
    saved = from_state(raw, type_table(GRPOTrainer.state_types))  # stored as plain data, decoded on resume
    assert [b.plan.index for b in saved.batches] == [2] and saved.pushes == 2 and saved.next_index == 3
    state = json.loads((full / "checkpoint-2/trainer_state.json").read_text())
    assert state["generation"] == 2 and state["sampler"] == saved.batches[0].plan.sampler_before
    for copy in (part, sync):
        shutil.copytree(full, copy)
        shutil.rmtree(copy / "checkpoint-4")
    GRPOTrainer(args=config(server, part, resume_from_checkpoint="latest", **kw), train_dataset=ROWS).train()
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for step in (2, 3):  # step 3: the saved batch; step 4: the first one generated after the resume
        for key in ("reward/mean", "loss", "grad_norm", "completion/mean_length", "is/is_ratio_mean",
                    "async/staleness_max"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-6), (step, key)
    GRPOTrainer(args=config(server, sync, resume_from_checkpoint="latest", async_generation=False,
                            **(kw | dict(max_steps=3))), train_dataset=ROWS).train()
    prompts = {d: [json.loads(x)["prompt"] for x in (d / "samples.jsonl").read_text().splitlines()
                   if json.loads(x)["step"] == 3] for d in (full, sync)}
    assert prompts[full] == prompts[sync]


@pytest.mark.slow
def test_online_dpo_runs_async(server, tmp_path):
    cfg = OnlineDPOConfig(output_dir=str(tmp_path), vllm_server_base_url=server.url, model_name_or_path=server.model,
                          reward_funcs=["vowel_share"], max_steps=3,
                          per_device_train_batch_size=4, max_completion_length=8, learning_rate=1e-5, seed=3,
                          save_only_model=True, save_final_model=False, async_generation=True, max_staleness=1)
    OnlineDPOTrainer(args=cfg, train_dataset=ROWS).train()
    rows = read_metrics(tmp_path)
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]
    for key in ("loss", "dpo/margin", "pairs/tied_frac", *ASYNC_KEYS):
        assert key in rows[-1], key
    assert not any(k.startswith("is/") for k in rows[-1])  # DPO's loss is off-policy by design: no IS weights


# ---------------------------------------------------------------- several training processes

LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vroll"]


def run_cli(cmd: list[str]) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_metrics(cmd[cmd.index("--output_dir") + 1])


@pytest.mark.slow
def test_two_processes_async_match_one_process(server, tmp_path):
    """Rank 0 generates ahead and broadcasts; with the same global batch, two processes train on
    the same samples (same versions, same staleness) as one process accumulating both halves."""
    def flags(out, accumulation: int) -> list[str]:
        return ["grpo", "--vllm_server_base_url", server.url, "--model_name_or_path", server.model,
                "--reward_funcs", "vowel_share", "--max_steps", "2", "--per_device_train_batch_size", "8",
                "--gradient_accumulation_steps", str(accumulation), "--num_generations", "4",
                "--max_completion_length", "8", "--dataset_size", "64", "--seed", "3", "--learning_rate", "1e-5",
                "--save_final_model", "false", "--save_only_model", "true", "--async_generation", "true",
                "--output_dir", str(out)]

    one = run_cli([sys.executable, "-m", "vroll", *flags(tmp_path / "one", 2)])
    two = run_cli([*LAUNCH_2, *flags(tmp_path / "two", 1)])
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        for key in ("reward/mean", "completion/mean_length", "async/staleness_max"):
            assert a[key] == b[key], key
        # is/mismatch_k3_kl: a token mean pooled over micro-batches (one process) and processes (two)
        for key in ("loss", "grad_norm", "is/is_ratio_mean", "is/mismatch_k3_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key
        assert a["is/is_ratio_max"] == pytest.approx(b["is/is_ratio_max"], rel=1e-3)  # max over ranks
    assert [r["async/staleness_max"] for r in two] == [0.0, 1.0]
