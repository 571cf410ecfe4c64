"""``OnlineDPOTrainer``: DPO on pairs sampled from the current policy and ranked online.

Per optimizer step: two completions for each prompt from the generator (a vroll
server, a colocated engine, or ``generate()``), scored by the reward functions (or a
reward model, ``rm:<name>``); the better one is chosen, the other rejected. Pairs
with equal rewards say nothing about preference and are left out of the loss by
default. The loss (``vroll.rl.losses.online_dpo_loss``, sigmoid or IPO) compares the
policy's summed log-probabilities with a frozen reference copy of the initial policy.

    trainer = OnlineDPOTrainer(model="smollm2-135m", reward_funcs=["addition_correct"],
                               args=OnlineDPOConfig(output_dir="runs/dpo", max_steps=50))
    trainer.train()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vroll.generation.rollout import Rollout
from vroll.rl.advantages import constant_groups
from vroll.rl.losses import LossOutput, online_dpo_loss
from vroll.trainer.base import OnlineTrainer, ScoredRollout
from vroll.trainer.config import OnlineDPOConfig
from vroll.trainer.logps import TokenBatch, batched_logps, completion_logps, mask_completions_with, pad_batch
from vroll.trainer.model.distributed import reference_model
from vroll.vision import ImageCodec, rollout_vision


@dataclass
class DPOMicroBatch:
    batch: TokenBatch  # 2B rows: B chosen completions, then their B rejected ones
    ref_logps: torch.Tensor  # (2B,) summed completion logps under the reference model
    pair_mask: torch.Tensor  # (B,) 1 for pairs in the loss, 0 for ties
    normalizer: int  # micro-batches in the step (gradient_accumulation_steps): the loss is their mean


def pick_pairs(rewards: torch.Tensor, drop_ties: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected index of each prompt's two completions, and which pairs count.

    Args:
        rewards: (2P,) prompt-major (completions 2i and 2i+1 belong to prompt i).

    Returns:
        chosen (P,), rejected (P,) indices into ``rewards``, and a (P,) float mask that
        is 0 for tied pairs when ``drop_ties``.
    """
    pairs = rewards.view(-1, 2)  # (P, 2)
    second_wins = (pairs[:, 1] > pairs[:, 0]).long()  # (P,)
    base = torch.arange(pairs.shape[0]) * 2  # (P,)
    chosen, rejected = base + second_wins, base + 1 - second_wins
    mask = torch.ones(pairs.shape[0])
    if drop_ties:
        mask = (pairs[:, 0] != pairs[:, 1]).float()
    return chosen, rejected, mask


class OnlineDPOTrainer(OnlineTrainer):
    """Online DPO (sigmoid or IPO) with any generation backend."""

    args: OnlineDPOConfig
    config_class = OnlineDPOConfig
    state_types = (*OnlineTrainer.state_types, DPOMicroBatch)  # its micro-batches, in a checkpoint cut mid-batch

    def setup_model(self, model: Any) -> None:
        self.image_codec = ImageCodec.for_model(model)  # None for a text-only policy
        # the initial policy, frozen
        self.ref_model = reference_model(model, self.accelerator)  # ZeRO-3/FSDP2: sharded too

    def _ranked(self, scored: ScoredRollout) -> torch.Tensor:
        """(2P,) rewards that rank each pair (minus the missing-EOS penalty)."""
        ranked = scored.rewards.clone()
        if self.args.missing_eos_penalty is not None:
            ranked -= self.args.missing_eos_penalty * torch.tensor(scored.rollout.truncated, dtype=ranked.dtype)
        return ranked

    def with_signal(self, scored: ScoredRollout) -> torch.Tensor:
        return ~constant_groups(self._ranked(scored), 2)  # a tied pair states no preference

    def uses_sampling_logprobs(self) -> bool:
        return False  # the DPO loss compares the policy with the reference, never with the sampler

    def build(self, scored: ScoredRollout) -> list[DPOMicroBatch]:
        args = self.args
        chosen, rejected, mask = pick_pairs(self._ranked(scored), args.drop_tied_pairs)
        lo, hi = self.my_slice(len(chosen))  # this process's pairs
        micro = args.per_device_train_batch_size
        return [self._micro_batch(scored.rollout, chosen[i : i + micro], rejected[i : i + micro], mask[i : i + micro])
                for i in range(lo, hi, micro)]

    def _micro_batch(self, rollout: Rollout, chosen: torch.Tensor, rejected: torch.Tensor,
                     mask: torch.Tensor) -> DPOMicroBatch:
        rows = chosen.tolist() + rejected.tolist()
        batch = pad_batch([rollout.prompt_ids[i] for i in rows], [rollout.completion_ids[i] for i in rows],
                          self.tokenizer.pad_token_id, [rollout.completion_mask[i] for i in rows])
        batch.vision = rollout_vision(self.image_codec, rollout, rows)  # the images, checked
        if batch.vision is not None:
            mask_completions_with(batch, self.image_codec.image_token_id, self.tokenizer.pad_token_id)
        batch = batch.to(self.accelerator.device)
        with self.accelerator.autocast():
            ref = (batched_logps(self.ref_model, batch, len(rows), options=self.forward_options)
                   * batch.completion_mask).sum(-1)  # (2B,)
        return DPOMicroBatch(batch, ref, mask.to(self.accelerator.device), self.args.gradient_accumulation_steps)

    def metrics(self, scored: ScoredRollout) -> dict[str, float]:
        ranked = self._ranked(scored)
        chosen, rejected, _ = pick_pairs(ranked, self.args.drop_tied_pairs)
        return super().metrics(scored) | {
            "pairs/tied_frac": float((ranked[chosen] == ranked[rejected]).float().mean()),
            "pairs/reward_chosen": float(ranked[chosen].mean()),
            "pairs/reward_rejected": float(ranked[rejected].mean())}

    def loss(self, model: torch.nn.Module, mb: DPOMicroBatch) -> LossOutput:
        with self.accelerator.autocast():
            logps, _ = completion_logps(model, mb.batch, options=self.forward_options)  # (2B, C)
        summed = (logps * mb.batch.completion_mask).sum(-1)  # (2B,)
        b = summed.shape[0] // 2
        out = online_dpo_loss(summed[:b], summed[b:], mb.ref_logps[:b], mb.ref_logps[b:], beta=self.args.beta,
                              loss_type=self.args.loss_type, pair_mask=mb.pair_mask)
        return LossOutput(out.loss / mb.normalizer, {f"dpo/{k.split('/')[1]}": v for k, v in out.metrics.items()})
