"""Dynamic sampling (``--dynamic_sampling``): every trained prompt has completions whose rewards differ."""

from __future__ import annotations

import pytest
import torch

from helpers import read_metrics
from vroll.generation.rollout import Rollout
from vroll.trainer.base import ScoredRollout
from vroll.trainer.config import GRPOConfig
from vroll.trainer.grpo import GRPOTrainer

# Half the prompts can be told apart by the reward, half cannot (every completion scores 0).
ROWS = [{"prompt": f"Say a word about the number {i}.", "signal": i % 2 == 0} for i in range(16)]


def alternating(prompts: list, completions: list[str], signal: list[bool], **kw: object) -> list[float]:
    """0, 1, 0, 1 over each group of a prompt with signal (one process: calls hold whole groups); else 0."""
    return [float(i % 2) if s else 0.0 for i, s in enumerate(signal)]


def run(server, out, **kw) -> list[dict]:
    cfg = GRPOConfig(output_dir=str(out), vllm_server_base_url=server.url, max_steps=3, per_device_train_batch_size=8,
                     num_generations=4, max_completion_length=6, learning_rate=1e-6, seed=5, logging_steps=1,
                     save_steps=0, save_final_model=False, **kw)
    GRPOTrainer(args=cfg, reward_funcs=[alternating], train_dataset=ROWS).train()
    return read_metrics(out)


@pytest.mark.slow
def test_every_trained_prompt_has_signal_and_the_reward_curve_counts_everything(server_trainer, tmp_path):
    rows = run(server_trainer, tmp_path / "dynamic", dynamic_sampling=True, max_generation_batches=8)
    assert all(r["reward/frac_zero_std_groups"] == 0.0 and r["dynamic/signal_frac_trained"] == 1.0 for r in rows)
    assert sum(r["dynamic/generations"] for r in rows) > len(rows)  # some step generated again
    # reward/mean is over all that was generated: half the prompts scored 0, so below the kept ones' 0.5
    assert all(r["dynamic/signal_frac_generated"] < 1.0 and r["reward/mean"] < 0.5 for r in rows)
    assert all(r["train/rows_with_gradient_frac"] == 1.0 for r in rows)
    # control: without it, the same seed trains prompts without signal
    plain = run(server_trainer, tmp_path / "plain")
    assert any(r["reward/frac_zero_std_groups"] > 0 for r in plain)
    assert not any("dynamic/generations" in r for r in plain)


@pytest.mark.slow
def test_online_dpo_trains_only_pairs_that_state_a_preference(server_trainer, tmp_path):
    from vroll.trainer.config import OnlineDPOConfig
    from vroll.trainer.online_dpo import OnlineDPOTrainer

    cfg = OnlineDPOConfig(output_dir=str(tmp_path), vllm_server_base_url=server_trainer.url, max_steps=2,
                          per_device_train_batch_size=4, max_completion_length=6, seed=5, logging_steps=1,
                          save_steps=0, save_final_model=False, dynamic_sampling=True, max_generation_batches=8)
    OnlineDPOTrainer(args=cfg, reward_funcs=[alternating], train_dataset=ROWS).train()
    rows = read_metrics(tmp_path)
    assert all(r["pairs/tied_frac"] == 0.0 and r["dynamic/signal_frac_trained"] == 1.0 for r in rows)
    assert sum(r["dynamic/generations"] for r in rows) > len(rows)


@pytest.mark.slow
def test_short_of_prompts_with_signal_the_batch_is_filled(server_trainer, tmp_path):
    rows = run(server_trainer, tmp_path, dynamic_sampling=True, max_generation_batches=1)
    assert [r["dynamic/generations"] for r in rows] == [1.0] * 3
    assert any(r["dynamic/signal_frac_trained"] < 1.0 for r in rows)  # filled with prompts scored alike
    assert all(r["dynamic/signal_frac_trained"] == 1 - r["reward/frac_zero_std_groups"] for r in rows)


def test_groups_are_taken_whole_and_in_order():
    def scored(first: int) -> ScoredRollout:
        ids = [[first + i] for i in range(6)]  # 3 prompts x 2 completions
        rollout = Rollout(ids, ids, [[1]] * 6, [str(x) for x in range(first, first + 6)], None, [False] * 6,
                          [first] * 6, 1.0)
        rewards = torch.arange(first, first + 6, dtype=torch.float32)
        return ScoredRollout([{"p": first + g} for g in range(3)], rollout, rewards, rewards[:, None])

    both = ScoredRollout.concat([scored(0), scored(10)])
    picked = both.groups([1, 3], 2)
    assert [r["p"] for r in picked.rows] == [1, 10]
    assert picked.rollout.texts == ["2", "3", "10", "11"] and picked.rewards.tolist() == [2.0, 3.0, 10.0, 11.0]
    assert picked.rollout.sampling_logps is None and both.rollout.seconds == 2.0  # generated one after another


@pytest.mark.parametrize("kw, message", [
    (dict(dynamic_sampling=True, async_generation=True), "dynamic_sampling decides after scoring"),
    (dict(max_generation_batches=0), "max_generation_batches must be >= 1"),
])
def test_bad_dynamic_sampling_configs_are_clear_errors(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(output_dir=str(tmp_path), vllm_server_base_url="http://127.0.0.1:1", **kw)
