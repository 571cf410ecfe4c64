"""What reaches the losses: ``Rollout.completion_mask`` (all ones changes nothing, zeros leave tokens
out), and only the rows that can have a gradient (the gradient is the whole batch's).

The expected numbers were recorded on the same fixed batch with the code before the mask existed
(commit 1821ba3), so a single-turn run trains exactly as it did.
"""

from __future__ import annotations

import pytest
import torch

from vroll.generation.prompts import encode_prompts
from vroll.generation.rollout import Rollout
from vroll.rows import prompt_of
from vroll.tasks.addition import addition_splits
from vroll.trainer import grpo
from vroll.trainer.base import ScoredRollout
from vroll.trainer.config import GRPOConfig, OnlineDPOConfig
from vroll.trainer.grpo import GRPOTrainer
from vroll.trainer.online_dpo import OnlineDPOTrainer

ROWS = addition_splits(seed=1, train_size=8, test_size=0)[0]
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25])
TEXTS = ["85", "The answer is 12.", "I think it is", "1234 + 5", "x", "Seventy", "99.", "no idea at all"]
# recorded before completion_mask existed: per micro-batch losses (GRPO), reference logps (DPO)
BEFORE = {"dapo": [0.18554550409317017, -0.009173212572932243],
          "grpo": [0.10651877522468567, -0.018295004963874817]}
DPO_REF_BEFORE = [[-9.307229995727539, -31.566726684570312, -13.131196975708008, -21.9635009765625],
                  [-30.25988006591797, -9.910429000854492, -19.223506927490234, -28.46644401550293]]


def fixed_rollout(tokenizer, rows: list[dict], n: int, mask_from: int | None = None) -> Rollout:
    """8 completions of varied length (every third truncated, no EOS) with made-up sampling logprobs.

    ``mask_from``: tokens from this index on are marked as an environment's (mask 0), as in a second turn.
    """
    prompts = encode_prompts(tokenizer, [prompt_of(r) for r in rows], 64)
    comps = [tokenizer(TEXTS[i % 8]).input_ids + ([tokenizer.eos_token_id] if i % 3 else [])
             for i in range(len(rows) * n)]
    masks = [[1 if mask_from is None or t < mask_from else 0 for t in range(len(c))] for c in comps]
    logps = [[-0.1 * (j + 1) - 0.05 * i for j in range(len(c))] for i, c in enumerate(comps)]
    return Rollout([prompts[i // n].token_ids for i in range(len(comps))], comps, masks,
                   [TEXTS[i % 8] for i in range(len(comps))], logps, [i % 3 == 0 for i in range(len(comps))],
                   [1] * len(comps), 0.0)


def grpo_trainer(tmp_path, loss_type: str) -> GRPOTrainer:
    cfg = GRPOConfig(output_dir=str(tmp_path), use_vllm=False, bf16=False, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, num_generations=4, max_completion_length=16, loss_type=loss_type,
                     seed=0, save_final_model=False)
    return GRPOTrainer(args=cfg, train_dataset=ROWS)


def grpo_losses(trainer: GRPOTrainer, rollout: Rollout) -> tuple[list[float], list[float]]:
    """Each micro-batch's loss, and its model-token normalizer (dapo's ``num_items``)."""
    mbs = trainer.build(ScoredRollout(ROWS[:2], rollout, REWARDS, REWARDS[:, None]))
    return [trainer.loss(trainer.model, mb).loss.item() for mb in mbs], [mb.num_items for mb in mbs]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_an_all_ones_mask_leaves_grpo_losses_as_they_were(tmp_path, loss_type):
    trainer = grpo_trainer(tmp_path, loss_type)
    losses, _ = grpo_losses(trainer, fixed_rollout(trainer.tokenizer, ROWS[:2], 4))
    assert losses == pytest.approx(BEFORE[loss_type], rel=1e-5, abs=1e-7)
    # negative control: the environment's tokens (from the third on) out of the loss change it,
    # and dapo's normalizer counts only the model's tokens
    masked = fixed_rollout(trainer.tokenizer, ROWS[:2], 4, mask_from=2)
    out, num_items = grpo_losses(trainer, masked)
    assert all(abs(a - b) > 1e-4 for a, b in zip(out, BEFORE[loss_type], strict=True)), out
    assert num_items[0] == sum(min(2, len(c)) for c in masked.completion_ids)  # the window's model tokens


def _grad_of(trainer: GRPOTrainer, scored: ScoredRollout) -> tuple[torch.Tensor, list[int]]:
    """The accumulated gradient of every micro-batch of ``scored`` (flattened), and each one's rows."""
    trainer.model.zero_grad()
    mbs = trainer.build(scored)
    for mb in mbs:
        trainer.loss(trainer.model, mb).loss.backward()
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return grad, [len(mb.batch) for mb in mbs]


@pytest.mark.slow  # two trainers' backward passes on the embedded model: ~10 s each
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])  # a global and a per-row normalizer; all in tests/rl
def test_rows_without_gradient_are_not_run_and_the_gradient_is_unchanged(tmp_path, loss_type, monkeypatch):
    """Micro-batch 1: rows 0 and 3 truncated (masked), row 2 at the group's mean reward (advantage 0),
    only row 1 trained; micro-batch 2: a group of equal rewards, no row with a gradient (one is run all
    the same). Against the same batch run whole."""
    trainer = grpo_trainer(tmp_path, loss_type)
    trainer.args.mask_truncated_completions = True
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3])
    scored = ScoredRollout(ROWS[:2], fixed_rollout(trainer.tokenizer, ROWS[:2], 4), rewards, rewards[:, None])
    skipped, rows = _grad_of(trainer, scored)
    assert rows == [1, 1]
    monkeypatch.setattr(grpo, "rows_with_gradient", lambda adv, mask, beta: torch.ones_like(adv, dtype=torch.bool))
    whole, all_rows = _grad_of(trainer, scored)
    assert all_rows == [4, 4] and float(whole.norm()) > 0
    torch.testing.assert_close(skipped, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))
    # control: the same rows normalized as a batch of their own (dapo's normalizer is global: no change)
    monkeypatch.undo()
    monkeypatch.setattr(grpo.GRPOMicroBatch, "__init__", _own_normalizers(grpo.GRPOMicroBatch.__init__))
    own, _ = _grad_of(trainer, scored)
    assert (float((own - whole).norm()) > 0.05 * float(whole.norm())) == (loss_type != "dapo")


def _own_normalizers(init):
    def wrapped(self, batch, *args, num_sequences, num_tokens, **kw):
        init(self, batch, *args, num_sequences=len(batch), num_tokens=float(batch.completion_mask.sum()), **kw)
    return wrapped


def test_an_all_ones_mask_leaves_online_dpo_as_it_was(tmp_path):
    cfg = OnlineDPOConfig(output_dir=str(tmp_path), use_vllm=False, bf16=False, per_device_train_batch_size=2,
                          max_completion_length=16, seed=0, save_final_model=False)
    trainer = OnlineDPOTrainer(args=cfg, train_dataset=ROWS)

    def ref_logps(rollout: Rollout) -> list[list[float]]:
        mbs = trainer.build(ScoredRollout(ROWS[:4], rollout, REWARDS, REWARDS[:, None]))
        return [mb.ref_logps.tolist() for mb in mbs]

    assert ref_logps(fixed_rollout(trainer.tokenizer, ROWS[:4], 2)) == [
        pytest.approx(r, rel=1e-5) for r in DPO_REF_BEFORE]
    masked = ref_logps(fixed_rollout(trainer.tokenizer, ROWS[:4], 2, mask_from=1))  # summed over model tokens only
    assert all(m > b + 1e-3 for m_row, b_row in zip(masked, DPO_REF_BEFORE, strict=True)
               for m, b in zip(m_row, b_row, strict=True)), masked


def test_a_mask_must_match_its_completion():
    with pytest.raises(ValueError, match="one entry per completion token"):
        Rollout([[1, 2]], [[3, 4, 5]], [[1, 1]], ["x"], None, [False], [0], 0.0)
