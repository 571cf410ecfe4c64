"""``--environment``: multi-turn episodes against the real server, their tokens, their loss, their errors."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from helpers import read_metrics
from vroll.environments import StepResult
from vroll.generation.episodes import EpisodeRunner
from vroll.generation.plain import TransformersGenerator
from vroll.generation.rollout import Rollout
from vroll.generation.server import ServerGenerator
from vroll.protocol import PromptInput, SamplingSpec
from vroll.tasks.addition import addition_splits
from vroll.trainer.base import ScoredRollout
from vroll.trainer.config import GRPOConfig
from vroll.trainer.grpo import GRPOTrainer
from vroll.weightsync.sender import WeightSyncConfig

ROWS = addition_splits(seed=4, train_size=16, test_size=0)[0]
BUDGET = 160  # completion tokens per episode (3 replies and 2 answers fit in the server's 512)


class Nudge:
    """Answers two replies with a user turn, then ends the episode: three replies whatever the model says."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.replies = 0

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return row["prompt"]

    def step(self, reply: str) -> StepResult:
        self.replies += 1
        if self.replies == 3:
            return StepResult([], done=True, reward=float(len(reply) % 3))
        return StepResult([{"role": "user", "content": f"Check {self.replies}: are you sure? Say it again."}])


FLAKY = itertools.count()


class Flaky(Nudge):
    """Raises on its first step in every other episode (an environment's bug), else as Nudge."""

    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__(row)
        self.broken = next(FLAKY) % 2 == 0

    def step(self, reply: str) -> StepResult:
        if self.broken:
            raise KeyError("the tool's backend is down")
        return super().step(reply)


class Recording:
    """The real server generator, keeping each turn's request and result (what the engine sampled)."""

    local = False

    def __init__(self, inner: ServerGenerator) -> None:
        self.inner = inner
        self.calls: list[tuple[list[PromptInput], SamplingSpec, Rollout]] = []

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout:
        out = self.inner.generate(prompts, sampling, first_index)
        self.calls.append((prompts, sampling, out))
        return out


@pytest.fixture(scope="module")
def episodes(server_trainer, model_path):
    """Two rows x two episodes of Nudge, sampled by the real server, and the calls that sampled them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    generator = Recording(ServerGenerator(server_trainer.url, None, 60.0, WeightSyncConfig()))
    runner = EpisodeRunner(Nudge, tokenizer, max_turns=3, max_prompt_length=128, max_completion_length=BUDGET)
    rollout = runner.run(generator, ROWS[:2], SamplingSpec(n=2, max_tokens=BUDGET, temperature=1.0, seed=11))
    generator.inner.close()
    return tokenizer, rollout, generator.calls


pytestmark = pytest.mark.slow


def test_the_trained_ids_are_the_sampled_ids_and_the_rendered_answers(episodes):
    tokenizer, rollout, calls = episodes
    assert [len(p) for p, _, _ in calls][0] == 4 and all(s.n == 1 for _, s, _ in calls)  # one call per turn
    assert len({s.seed for _, s, _ in calls}) == len(calls)  # each turn samples with its own seeds
    read_back = 0
    for i, info in enumerate(rollout.episodes):
        ids, mask, logps, ended = [], [], [], True
        for turn, (prompts, _, out) in enumerate(calls[: info.turns]):
            j = sum(e.turns > turn for e in rollout.episodes[:i])  # its place among the live episodes
            assert prompts[j].token_ids == out.prompt_ids[j] == rollout.prompt_ids[i] + ids  # the engine saw them
            room = BUDGET - len(ids)  # a reply longer than its episode's room is cut (and ends the episode)
            sampled, sampled_logps = out.completion_ids[j][:room], out.sampling_logps[j][:room]
            ids, mask, logps = ids + sampled, mask + [1] * len(sampled), logps + sampled_logps
            ended = ended and sampled[-1:] == [tokenizer.eos_token_id]
            if turn + 1 < info.turns:  # the environment's rendered answer: what the next turn's prompt adds
                answer = calls[turn + 1][0][sum(e.turns > turn + 1 for e in rollout.episodes[:i])].token_ids
                answer = answer[len(rollout.prompt_ids[i]) + len(ids):]
                ids, mask, logps = ids + answer, mask + [0] * len(answer), logps + [0.0] * len(answer)
        assert rollout.completion_ids[i] == ids
        assert rollout.completion_mask[i] == mask
        assert rollout.sampling_logps[i] == logps
        if ended and not rollout.truncated[i]:  # (a truncated one's last answer did not fit: not in its ids)
            # the ids read back as the chat template renders the whole conversation, answers included
            text = tokenizer.apply_chat_template([m.for_template() for m in info.messages], tokenize=False)
            assert tokenizer.decode(rollout.prompt_ids[i] + ids) + "\n" == text
            read_back += 1
    assert read_back > 0  # else the check above checked nothing
    full = [e for e, cut in zip(rollout.episodes, rollout.truncated, strict=True) if e.turns == 3 and not cut]
    assert full and all(e.token_counts[1] > 0 and e.reward is not None for e in full)  # answers between 3 replies
    assert [m.role for m in full[0].messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]


def grpo_config(tmp_path, **kw: Any) -> GRPOConfig:
    base = dict(output_dir=str(tmp_path), bf16=False, per_device_train_batch_size=4, num_generations=2,
                max_completion_length=BUDGET, seed=0, save_final_model=False, save_only_model=True)
    return GRPOConfig(**(base | kw))


def test_the_environments_tokens_stay_out_of_the_loss(episodes, tmp_path):
    _, rollout, _ = episodes
    trainer = GRPOTrainer(args=grpo_config(tmp_path, use_vllm=False), train_dataset=ROWS)  # build and loss only
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])

    def loss(r: Rollout) -> tuple[float, float]:
        (mb,) = trainer.build(ScoredRollout(ROWS[:2], r, rewards, rewards[:, None]))
        return trainer.loss(trainer.model, mb).loss.item(), mb.num_items

    masked, num_items = loss(rollout)
    assert num_items == sum(e.token_counts[0] for e in rollout.episodes)  # dapo counts the model's tokens
    # negative control: the same episodes with the environment's tokens trained
    trained = Rollout(**{**rollout.__dict__, "completion_mask": [[1] * len(c) for c in rollout.completion_ids]})
    unmasked, all_tokens = loss(trained)
    assert all_tokens == sum(len(c) for c in rollout.completion_ids) > num_items
    assert abs(unmasked - masked) > 1e-4, (masked, unmasked)


def test_an_environment_that_raises_ends_its_episode_not_the_run(server_trainer, tmp_path):
    cfg = grpo_config(tmp_path, environment="test_environments:Flaky", vllm_server_base_url=server_trainer.url,
                      max_steps=2, max_completion_length=96, max_turns=2, temperature=0.5,
                      per_device_train_batch_size=2)  # one prompt, two episodes (one broken) per step
    GRPOTrainer(args=cfg, train_dataset=ROWS).train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert sum(r["env/errors"] for r in rows) > 0 and "reward/environment/mean" in rows[0]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    broken = [s for s in samples if "env_error" in s]
    assert broken and all(s["env_error"] == "KeyError: \"the tool's backend is down\"" for s in broken)
    assert all(s["env_reward"] == 0.0 and s["turns"] == 1 for s in broken)
    assert any("env_error" not in s and s["turns"] > 1 for s in samples)  # the others went on


def test_episodes_are_generated_ahead_with_async_generation(server_trainer, tmp_path):
    # the producer thread runs the episodes (with the runner's own tokenizer) while the trainer trains
    cfg = grpo_config(tmp_path, environment="test_environments:Nudge", vllm_server_base_url=server_trainer.url,
                      max_steps=2, max_completion_length=64, max_turns=2, per_device_train_batch_size=2,
                      temperature=0.5, async_generation=True, max_staleness=1)
    GRPOTrainer(args=cfg, train_dataset=ROWS).train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["async/staleness_max"] == 1  # sampled one push ago
    assert all(r["env/turns_mean"] >= 1 and r["env/errors"] == 0 for r in rows)


def test_vroll_grpo_environment_calculator_end_to_end(server_trainer, tmp_path):
    cmd = [sys.executable, "-m", "vroll", "grpo", "--environment", "calculator", "--dataset_name", "calculator",
           "--vllm_server_base_url", server_trainer.url, "--max_steps", "2", "--per_device_train_batch_size", "2",
           "--num_generations", "2", "--max_completion_length", "48", "--max_turns", "2", "--dataset_size", "8",
           "--output_dir", str(tmp_path), "--save_final_model", "false", "--save_only_model", "true", "--seed", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert 0 < rows[0]["env/model_token_frac"] <= 1 and rows[0]["env/errors"] == 0
    assert "reward/environment/mean" in rows[0]
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert sample["conversation"][0]["content"].startswith("Use the calculator")



def test_the_plain_generator_drives_episodes_too(hf_model, episodes):
    # generate() on the policy (no sampling logprobs): the same driver, greedy, on two short questions
    tokenizer = episodes[0]
    runner = EpisodeRunner(Nudge, tokenizer, max_turns=2, max_prompt_length=128, max_completion_length=40)
    rollout = runner.run(TransformersGenerator(hf_model, tokenizer), ROWS[:2],
                         SamplingSpec(n=1, max_tokens=40, temperature=0.0))
    assert rollout.sampling_logps is None
    two = [i for i, e in enumerate(rollout.episodes) if e.turns == 2]
    assert two, [e.messages for e in rollout.episodes]
    mask = rollout.completion_mask[two[0]]
    assert mask[0] == 1 and 0 in mask and mask[-1] == 1  # reply, answer, reply
