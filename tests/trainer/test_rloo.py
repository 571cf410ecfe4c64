"""RLOO: a third algorithm in one small file, run through the shared loop."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import read_metrics
from vroll.rl.advantages import leave_one_out_advantages
from vroll.tasks.addition import addition_splits
from vroll.trainer.rloo import RLOOConfig, RLOOTrainer

pytestmark = pytest.mark.slow


def test_rloo_trains_with_leave_one_out_advantages(tmp_path):
    cfg = RLOOConfig(output_dir=str(tmp_path), use_vllm=False, max_steps=2, per_device_train_batch_size=8,
                     num_generations=4, max_completion_length=8, learning_rate=1e-5, seed=0,
                     save_final_model=False, save_only_model=True)
    trainer = RLOOTrainer(args=cfg, train_dataset=addition_splits(seed=2, train_size=64, test_size=0)[0])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    assert torch.equal(trainer.advantages(rewards), leave_one_out_advantages(rewards, 4))
    trainer.train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["advantage/abs_mean"]) for r in rows)
