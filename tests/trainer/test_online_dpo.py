"""Online DPO: pair selection by hand, a server-mode run with every artifact, exact resume."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import read_metrics
from vroll.tasks.addition import addition_splits
from vroll.trainer.config import OnlineDPOConfig
from vroll.trainer.online_dpo import OnlineDPOTrainer, pick_pairs

ROWS = addition_splits(seed=1, train_size=64, test_size=0)[0]


@pytest.fixture
def server(tiny_served):
    return tiny_served


def config(server, out, **kw) -> OnlineDPOConfig:
    """On the shared tiny model: artifacts and exact resume are mechanics, not learning. Its vowel-share
    reward differs between almost any two completions, so pairs are rarely tied and the loss is live."""
    base = dict(output_dir=str(out), vllm_server_base_url=server.url, model_name_or_path=server.model,
                reward_funcs=["vowel_share"], max_steps=2, per_device_train_batch_size=4,
                max_completion_length=8, learning_rate=1e-5, seed=3, logging_steps=1)
    return OnlineDPOConfig(**(base | kw))


def test_pick_pairs_by_hand():
    # prompt 0: 0.2 vs 0.9 -> second wins; prompt 1: 1.0 vs 0.0 -> first wins; prompt 2: tie.
    rewards = torch.tensor([0.2, 0.9, 1.0, 0.0, 0.5, 0.5])
    chosen, rejected, mask = pick_pairs(rewards, drop_ties=True)
    assert chosen.tolist() == [1, 2, 4] and rejected.tolist() == [0, 3, 5]
    assert mask.tolist() == [1.0, 1.0, 0.0]
    assert pick_pairs(rewards, drop_ties=False)[2].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_online_dpo_run_writes_artifacts_and_resumes_exactly(server, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    OnlineDPOTrainer(args=config(server, full, max_steps=3, save_steps=2), train_dataset=ROWS).train()
    rows = read_metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "dpo/margin", "dpo/accuracy", "pairs/tied_frac", "pairs/reward_chosen",
                "reward/vowel_share/mean", "time/generate_s", "time/sync_s", "grad_norm"):
        assert key in rows[-1], key
    for r in rows:  # the chosen completion never scores below the rejected one
        assert r["pairs/reward_chosen"] >= r["pairs/reward_rejected"]
    assert min(r["pairs/tied_frac"] for r in rows) < 1  # some pairs train: the resume check below has teeth
    assert max(r["grad_norm"] for r in rows) > 0
    for name in ("samples.jsonl", "reward_curve.png", "checkpoint-2/optimizer.pt", "checkpoint-3/model.safetensors",
                 "final/model.safetensors"):
        assert (full / name).exists(), name
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoint-3")
    OnlineDPOTrainer(args=config(server, part, max_steps=3, resume_from_checkpoint="latest"),
                     train_dataset=ROWS).train()
    a, b = rows, read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("reward/mean", "loss", "dpo/margin", "grad_norm"):
        assert a[2][key] == pytest.approx(b[2][key], rel=1e-4, abs=1e-6), key


def test_a_trainer_given_another_trainers_config_says_so(tmp_path):
    from vroll.trainer.config import GRPOConfig

    with pytest.raises(TypeError, match="OnlineDPOTrainer needs a OnlineDPOConfig, got GRPOConfig"):
        OnlineDPOTrainer(args=GRPOConfig(output_dir=str(tmp_path)))


@pytest.mark.parametrize(("kw", "message"), [
    (dict(loss_type="hinge"), "loss_type must be one of sigmoid, ipo"),
    (dict(beta=0.0), "beta must be > 0"),
])
def test_bad_dpo_config_is_a_clear_error(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        OnlineDPOConfig(output_dir=str(tmp_path), **kw)
