"""GRPO end to end against a real server: artifacts, exact resume, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import free_port, read_metrics
from vroll.client import ServerUnavailable
from vroll.rewards import RewardFunctionError
from vroll.tasks.addition import addition_splits
from vroll.trainer.config import GRPOConfig
from vroll.trainer.grpo import GRPOTrainer

pytestmark = pytest.mark.slow

ROWS = addition_splits(seed=1, train_size=64, test_size=0)[0]


@pytest.fixture
def server(tiny_served):
    return tiny_served


def config(server, out, **kw) -> GRPOConfig:
    """On the shared tiny model: these are mechanics (artifacts, pushes, resume, errors), not learning."""
    base = dict(output_dir=str(out), vllm_server_base_url=server.url, model_name_or_path=server.model, max_steps=2,
                per_device_train_batch_size=8,
                num_generations=4, max_completion_length=8, learning_rate=1e-5, seed=3, logging_steps=1,
                save_only_model=True)  # only resume needs the optimizer state
    return GRPOConfig(**(base | kw))


def test_grpo_run_writes_every_artifact_and_syncs_the_server(server, tmp_path):
    version = server.client().info().weight_version
    GRPOTrainer(args=config(server, tmp_path, vllm_api_key="s3cret-key"), train_dataset=ROWS).train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "reward/addition_correct/mean", "reward/addition_format/std", "loss",
                "clip_ratio", "is/is_ratio_mean", "completion/mean_length", "generate/tokens_per_s",
                "time/generate_s", "time/score_s", "time/train_s", "time/sync_s", "time/step_s",
                # the trainer/vLLM mismatch (issue 29): 8-token completions, so only the shortest length bucket
                "is/mismatch_k3_kl", "is/mismatch_k3_kl/len_lt512", "is/masked_token_frac", "is/masked_seq_frac"):
        assert key in rows[-1], key
    assert rows[-1]["is/mismatch_k3_kl/len_lt512"] == pytest.approx(rows[-1]["is/mismatch_k3_kl"])
    assert "is/mismatch_k3_kl/len_512_2k" not in rows[-1] and rows[-1]["is/masked_token_frac"] == 0.0  # truncation
    for name in ("samples.jsonl", "reward_curve.png", "checkpoint-2/model.safetensors",
                 "final/model.safetensors", "final/tokenizer.json", "config.json"):
        assert (tmp_path / name).exists(), name
    assert not (tmp_path / "checkpoint-2/optimizer.pt").exists()  # save_only_model
    saved = (tmp_path / "config.json").read_text()
    assert "s3cret-key" not in saved and json.loads(saved)["vllm_api_key"] == "***"
    # pushed before the first generation, after step 1, and at the end
    assert server.client().info().weight_version == version + 3


def test_without_is_correction_the_server_is_not_asked_for_logprobs(server, tmp_path):
    """The loss reads the sampler's logprobs only for the importance-sampling correction; without it
    the trainer asks for none (vLLM skips that work) and trains as before. Control: with it, it asks."""
    from vroll.trainer.config import OnlineDPOConfig
    from vroll.trainer.online_dpo import OnlineDPOTrainer

    on = GRPOTrainer(args=config(server, tmp_path / "on"), train_dataset=ROWS)
    assert on.rollouts.planner.plan(0).sampling.return_logprobs
    off = GRPOTrainer(args=config(server, tmp_path / "off", max_steps=1, vllm_importance_sampling_correction=False),
                      train_dataset=ROWS)
    assert not off.rollouts.planner.plan(0).sampling.return_logprobs
    off.train()
    [row] = read_metrics(tmp_path / "off")
    assert not any(k.startswith("is/") for k in row) and row["completion/mean_length"] > 0
    dpo = OnlineDPOConfig(output_dir=str(tmp_path / "dpo"), vllm_server_base_url=server.url,
                          per_device_train_batch_size=4)
    assert not OnlineDPOTrainer(args=dpo, train_dataset=ROWS).rollouts.planner.plan(0).sampling.return_logprobs


def test_resume_continues_exactly(server, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    # vowel_share differs between almost any two of the tiny model's completions: the steps train
    kw = dict(max_steps=3, save_only_model=False, reward_funcs=["vowel_share"])
    GRPOTrainer(args=config(server, full, save_steps=2, **kw), train_dataset=ROWS).train()
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoint-3")
    GRPOTrainer(args=config(server, part, resume_from_checkpoint="latest", **kw), train_dataset=ROWS).train()
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert a[2]["grad_norm"] > 0  # the check has teeth
    for key in ("reward/mean", "loss", "completion/mean_length", "grad_norm"):
        assert a[2][key] == pytest.approx(b[2][key], rel=1e-4, abs=1e-6), key


def test_no_server_says_how_to_start_one(tmp_path):
    cfg = GRPOConfig(output_dir=str(tmp_path), vllm_server_port=free_port(), vllm_server_timeout=1.5)
    with pytest.raises(ServerUnavailable, match="vroll serve --model"):
        GRPOTrainer(args=cfg, train_dataset=ROWS)


@pytest.mark.parametrize(("kw", "message"), [
    (dict(per_device_train_batch_size=6, num_generations=4), "must be divisible by num_generations 4"),
    (dict(loss_type="ppo"), "loss_type must be one of grpo, bnpo, dr_grpo, dapo"),
    (dict(reward_funcs=["nope"]), "nope"),
])
def test_bad_config_fails_before_the_first_step(server, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        GRPOTrainer(args=config(server, tmp_path, **kw), train_dataset=ROWS)


def test_dataset_without_a_prompt_column(server, tmp_path):
    with pytest.raises(ValueError, match=r"no 'prompt' or 'messages' column; its columns are \['question'\]"):
        GRPOTrainer(args=config(server, tmp_path), train_dataset=[{"question": "hi"}])


def broken_reward(prompts, completions, **kw):
    raise KeyError("boom")


def short_reward(prompts, completions, **kw):
    return [1.0]


@pytest.mark.parametrize(("func", "message"), [
    (broken_reward, "broken_reward"), (short_reward, "returned 1 scores for 8 completions"),
])
def test_reward_function_errors_name_the_function(server, tmp_path, func, message):
    trainer = GRPOTrainer(args=config(server, tmp_path), reward_funcs=[func], train_dataset=ROWS)
    with pytest.raises(RewardFunctionError, match=message):
        trainer.train()


def test_plain_generate_mode_needs_no_server_and_learns(tmp_path):
    cfg = GRPOConfig(output_dir=str(tmp_path), use_vllm=False, max_steps=8, per_device_train_batch_size=16,
                     num_generations=4, max_completion_length=16, learning_rate=5e-5, seed=0, save_final_model=False,
                     save_only_model=True)
    GRPOTrainer(args=cfg, train_dataset=addition_splits(seed=2, train_size=256, test_size=0)[0]).train()
    rewards = [r["reward/mean"] for r in read_metrics(tmp_path)]
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards


def test_eval_steps_logs_strict_held_out_accuracy_and_plots_it(tmp_path):
    """``vroll grpo --eval_steps 2``: the command gives the trainer its eval callback (the trainer imports no
    evaluation code: vroll.evaluate sits above it)."""
    from vroll.cli import main

    assert main(["grpo", "--output_dir", str(tmp_path), "--use_vllm", "false", "--max_steps", "2",
                 "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "16",
                 "--seed", "0", "--save_final_model", "false", "--save_only_model", "true", "--dataset_size", "64",
                 "--data_seed", "2", "--eval_steps", "2", "--eval_n", "4"]) == 0
    rows = read_metrics(tmp_path)
    assert "eval/accuracy" not in rows[0]  # step 1: not an eval step
    assert rows[1]["eval/accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 problems, strict greedy
    assert 0.0 <= rows[1]["eval/truncated_frac"] <= 1.0
    assert (tmp_path / "reward_curve.png").exists()


def test_eval_steps_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="eval_steps"):
        GRPOConfig(output_dir=str(tmp_path), eval_steps=-1)
