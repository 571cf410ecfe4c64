"""Trainers on a real GPU: colocate mode (sleep mode on) and plain generate().

Runs on the GPU machine only; skipped where CUDA is not available. The model is the
random-weight Qwen2.5-0.5B-shaped one of ``test_gpu_server.py`` (no download), so the
reward is one its random text varies in (the share of vowels): what is checked is
the plumbing on CUDA, not learning (``tests/trainer`` checks learning on CPU).

- colocate: after every step the engine's logprobs match the trainer's model (bf16
  tolerance) and not the initial model's; the engine sleeps between generations;
- ``--use_vllm false``: a GRPO step on the GPU;
- Online DPO in colocate mode from the command line;
- colocate with async generation (the engine on a side stream beside the training kernels).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def check_step(row: dict, max_tokens: int) -> None:
    """What every GPU step must log: lengths within max_tokens, rewards in [0, 1], finite loss and gradient."""
    assert 0 < row["completion/mean_length"] <= row["completion/max_length"] <= max_tokens, row
    assert 0.0 <= row["reward/mean"] <= 1.0, row  # addition_format scores 0, 0.5 or 1
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]), row  # no NaN/inf from device mix-ups


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    if os.environ.get("VROLL_GPU_TEST_MODEL"):
        return os.environ["VROLL_GPU_TEST_MODEL"]
    out = tmp_path_factory.mktemp("model") / "qwen2.5-0.5b"
    subprocess.run([sys.executable, str(REPO / "benchmarks/gpu/make_model.py"), "--shape", "qwen2.5-0.5b",
                    "--out", str(out)], check=True)
    return str(out)


def test_colocate_engine_tracks_the_trainer_with_sleep_mode(model_dir: str, tmp_path: Path):
    cmd = [sys.executable, str(REPO / "tests/trainer/colocate_probe.py"), "--out", str(tmp_path), "--steps", "4",
           "--lr", "1e-5", "--model", model_dir, "--reward", "vowels", "--sleep"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads((tmp_path / "probe.json").read_text())
    if os.environ.get("VROLL_GPU_METRICS"):
        Path(os.environ["VROLL_GPU_METRICS"]).with_name("gpu_colocate_probe.json").write_text(json.dumps(records))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["err_vs_trainer"] < 0.1, r  # bf16 engine vs float32 trainer
        if r["trainer_moved"] > 0.05:
            assert r["err_vs_trainer"] < 0.5 * r["err_vs_initial"], r


def test_plain_generate_grpo_step_on_gpu(model_dir: str, tmp_path: Path):
    from vroll.trainer.config import GRPOConfig
    from vroll.trainer.grpo import GRPOTrainer

    cfg = GRPOConfig(output_dir=str(tmp_path), model_name_or_path=model_dir, use_vllm=False, max_steps=1,
                     per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
                     reward_funcs=["addition_format"], save_final_model=False, save_only_model=True)
    GRPOTrainer(args=cfg, train_dataset=[{"prompt": f"What is {i} + 1?"} for i in range(16)]).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    check_step(rows[0], max_tokens=16)


def test_online_dpo_colocate_on_gpu(model_dir: str, tmp_path: Path):
    cmd = [sys.executable, "-m", "vroll", "online-dpo", "--model_name_or_path", model_dir, "--vllm_mode", "colocate",
           "--vllm_enable_sleep_mode", "true", "--vllm_enforce_eager", "true", "--max_steps", "2",
           "--per_device_train_batch_size", "8", "--max_completion_length", "16", "--dataset_size", "32",
           "--reward_funcs", "addition_format", "--save_final_model", "false", "--save_only_model", "true",
           "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["weight_version"] == 2.0
    for r in rows:
        check_step(r, max_tokens=16)


def test_colocate_async_generates_on_a_side_stream(model_dir: str, tmp_path: Path):
    """The producer thread drives the engine on its own CUDA stream while the trainer trains: the
    schedule of a one-step-off run (versions 1, 1, 2, 3) and finite steps on the GPU."""
    cmd = [sys.executable, "-m", "vroll", "grpo", "--model_name_or_path", model_dir, "--vllm_mode", "colocate",
           "--vllm_gpu_memory_utilization", "0.3", "--async_generation", "true", "--max_steps", "4",
           "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "16",
           "--dataset_size", "64", "--reward_funcs", "addition_format", "--save_final_model", "false",
           "--save_only_model", "true", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["weight_version"] for r in rows] == [1.0, 1.0, 2.0, 3.0]
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    for r in rows:
        check_step(r, max_tokens=16)
