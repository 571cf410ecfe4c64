"""The training path at user shapes (issue 29): packed rows, the chunked lm_head and token-budget
micro-batches give today's padded, full-logits, row-cut gradient on the fixed rollout of
``test_completion_mask`` (grpo, dapo; bnpo by its window definition), and a run with them learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_completion_mask import REWARDS, ROWS, fixed_rollout

from helpers import read_metrics
from vroll.tasks.addition import addition_splits
from vroll.trainer import grpo
from vroll.trainer.base import ScoredRollout
from vroll.trainer.bookkeeping.step_metrics import combine, pooled_means
from vroll.trainer.config import GRPOConfig
from vroll.trainer.grpo import GRPOTrainer
from vroll.trainer.logps import forward_options

pytestmark = pytest.mark.slow  # backward passes of the embedded 135M model


@pytest.fixture
def trainer(tmp_path):  # per test: the suite resets accelerate's state between tests
    cfg = GRPOConfig(output_dir=str(tmp_path), use_vllm=False, bf16=False,
                     per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
                     max_completion_length=16, seed=0, save_final_model=False)
    return GRPOTrainer(args=cfg, train_dataset=ROWS)


def _set(trainer: GRPOTrainer, **kw) -> None:
    """Today's path (padded rows, full logits, ``per_device_train_batch_size`` rows a micro-batch) unless
    ``kw`` says otherwise."""
    base = dict(padding_free=False, logps_chunk_tokens=0, max_tokens_per_micro_batch=None,
                per_device_train_batch_size=4, gradient_accumulation_steps=2)
    for key, value in (base | kw).items():
        setattr(trainer.args, key, value)
    trainer.forward_options = forward_options(trainer.model, trainer.args)
    trainer.set_loss_configs()  # the loss's settings are read from args once, at construction


def _window_grad(trainer: GRPOTrainer, scored: ScoredRollout) -> tuple[torch.Tensor, list[list[int]]]:
    """The gradient of one optimizer step over the whole generation batch (flattened), and each
    micro-batch's rows' (prompt + completion) token counts."""
    trainer.model.zero_grad()
    sizes = []
    for step in trainer.build(scored):
        for mb in step if isinstance(step, list) else [step]:
            trainer.loss(trainer.model, mb).loss.backward()
            sizes.append(mb.batch.attention_mask.sum(-1).tolist())
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]), sizes


def _own_normalizers(init):
    """The old per-micro-batch normalizers on window micro-batches (the control)."""
    def wrapped(self, batch, advantages, old, ref, server, num_items, *, num_sequences, num_tokens, **kw):
        init(self, batch, advantages, old, ref, server, float(batch.completion_mask.sum()),
             num_sequences=len(batch), num_tokens=float(batch.completion_mask.sum()), **kw)
    return wrapped


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo"])
def test_packed_chunked_token_budget_gradient_is_todays(trainer, loss_type, monkeypatch):
    trainer.args.loss_type = loss_type
    rollout = fixed_rollout(trainer.tokenizer, ROWS[:2], 4)
    scored = ScoredRollout(ROWS[:2], rollout, REWARDS, REWARDS[:, None])
    # bnpo over a token-budget window is the window's token mean: today's with the window as one micro-batch
    _set(trainer, **({"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
                     if loss_type == "bnpo" else {}))
    today, _ = _window_grad(trainer, scored)
    longest = max(len(p) + len(c) for p, c in zip(rollout.prompt_ids, rollout.completion_ids, strict=True))
    _set(trainer, padding_free=True, logps_chunk_tokens=16, max_tokens_per_micro_batch=longest + 4)
    assert trainer.forward_options.packed and trainer.forward_options.chunk_tokens == 16
    new, sizes = _window_grad(trainer, scored)
    # every micro-batch fits the budget, and more of them run than the two row micro-batches
    assert all(sum(s) <= longest + 4 for s in sizes) and len(sizes) > 2, sizes
    assert sorted(n for s in sizes for n in s) == sorted(len(p) + len(c) for p, c in zip(
        rollout.prompt_ids, rollout.completion_ids, strict=True))  # every row once (all trainable here)
    assert float(today.norm()) > 0
    torch.testing.assert_close(new, today, rtol=1e-4, atol=1e-4 * float(today.abs().max()))
    # control: the same micro-batches, each normalized as a batch of its own, give another gradient
    monkeypatch.setattr(grpo.GRPOMicroBatch, "__init__", _own_normalizers(grpo.GRPOMicroBatch.__init__))
    own, _ = _window_grad(trainer, scored)
    assert float((own - today).norm()) > 0.05 * float(today.norm())


def test_bnpo_over_a_window_is_not_the_mean_of_row_micro_batches(trainer):
    """bnpo's one change of meaning (docs/design/user_scale_training.md, section 3): today's row cut
    averages each micro-batch's token mean, which differs from the window's token mean here."""
    trainer.args.loss_type = "bnpo"
    scored = ScoredRollout(ROWS[:2], fixed_rollout(trainer.tokenizer, ROWS[:2], 4), REWARDS, REWARDS[:, None])
    _set(trainer)
    rows_cut, _ = _window_grad(trainer, scored)
    _set(trainer, per_device_train_batch_size=8, gradient_accumulation_steps=1)
    window, _ = _window_grad(trainer, scored)
    assert float((rows_cut - window).norm()) > 0.05 * float(window.norm())


@pytest.mark.timeout(1800)  # ~6 min alone; 12-15 on the shared 2-core machine
def test_a_run_with_the_new_defaults_and_a_token_budget_learns(tmp_path):
    cfg = GRPOConfig(output_dir=str(tmp_path), use_vllm=False, max_steps=6, per_device_train_batch_size=8,
                     gradient_accumulation_steps=2, num_generations=4, max_completion_length=16,
                     max_prompt_length=128, max_tokens_per_micro_batch=200, learning_rate=5e-5, seed=0,
                     save_final_model=False, save_only_model=True)
    assert cfg.padding_free and cfg.logps_chunk_tokens == 1024  # the defaults
    GRPOTrainer(args=cfg, train_dataset=addition_splits(seed=2, train_size=256, test_size=0)[0]).train()
    rows = read_metrics(tmp_path)
    rewards = [r["reward/mean"] for r in rows]
    assert len(rewards) == 6
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert all(r["train/padding_share"] == 0.0 and r["train/tokens"] > 0 for r in rows), rows[0]
    # 16 rows a step in micro-batches of at most 200 tokens: more than the row cut's 2 while rows train (once
    # every group's rewards are equal, no row has a gradient: one dummy pass)
    assert max(r["train/micro_batches"] for r in rows) > 2, [r["train/micro_batches"] for r in rows]


@pytest.mark.parametrize("agree", [True, False])
def test_processes_with_uneven_lengths_agree_on_the_micro_batch_count(tmp_path, agree):
    """``agree_max`` over two gloo processes: every window runs as many micro-batches on both (their
    own cuts differ: 1 and 4 in the first window), rows split or padded with empty (dummy) ones.
    Control (``agree`` False): the processes' own counts differ, which would hang DDP/ZeRO/FSDP."""
    probe = Path(__file__).with_name("agree_probe.py")
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(probe),
                           "--out", str(tmp_path), *([] if agree else ["--no-agree"])],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["own"] != ranks[1]["own"]
    same = [len(p) for p in ranks[0]["parts"]] == [len(p) for p in ranks[1]["parts"]]
    assert same == agree, ranks
    if agree:
        assert ranks[0]["counts"] == ranks[1]["counts"] == [max(a, b) for a, b in zip(
            ranks[0]["own"], ranks[1]["own"], strict=True)]
        for rank, rows in zip(ranks, (8, 4), strict=True):  # every row in exactly one micro-batch
            assert sorted(i for window in rank["parts"] for part in window for i in part) == sorted(
                i for w in ((4, 4) if rows == 8 else (4, 0)) for i in range(w))


def test_the_sampling_correction_mode_reaches_the_loss_and_its_metrics(tmp_path):
    """--vllm_importance_sampling_mode in the trainer, on the fixed rollout's made-up sampler logprobs (no engine):
    the mismatch metrics are the mode-independent k3 KL, pooled per length bucket. Those logprobs are far from
    the model's: no token ratio reaches the default's truncation at 2, but every sequence's (their product over
    the tokens) lies below 1e-3, so sequence masking with clip_min 0.5 drops every completion."""
    def step(**kw) -> tuple[list[float], dict[str, float]]:
        cfg = GRPOConfig(output_dir=str(tmp_path), use_vllm=False, bf16=False, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, num_generations=4, max_completion_length=16, seed=0,
                         save_final_model=False, **kw)
        trainer = GRPOTrainer(args=cfg, train_dataset=ROWS)
        scored = ScoredRollout(ROWS[:2], fixed_rollout(trainer.tokenizer, ROWS[:2], 4), REWARDS, REWARDS[:, None])
        outs = [trainer.loss(trainer.model, mb) for mb in trainer.build(scored)]
        return [o.loss.item() for o in outs], pooled_means(combine([o.metrics for o in outs]))

    truncate_losses, truncate = step()  # token_truncate at 2: vroll's default
    mask_losses, masked = step(vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_min=0.5)
    assert truncate["is/mismatch_k3_kl"] > 0 and truncate["is/mismatch_k3_kl"] == masked["is/mismatch_k3_kl"]
    assert truncate["is/mismatch_k3_kl/len_lt512"] == pytest.approx(truncate["is/mismatch_k3_kl"])  # all short
    assert "is/mismatch_k3_kl/len_512_2k" not in truncate and not any(k.endswith(":sum") for k in truncate)
    assert truncate["is/masked_token_frac"] == truncate["is/masked_seq_frac"] == 0.0  # truncation drops nothing
    assert truncate["is/is_clipped_frac"] == 0.0 and all(loss != 0 for loss in truncate_losses)
    assert masked["is/masked_seq_frac"] == masked["is/masked_token_frac"] == masked["is/is_clipped_frac"] == 1.0
    assert masked["is/is_ratio_max"] < 1e-3 and mask_losses == [0.0, 0.0]  # the mode reaches the loss
