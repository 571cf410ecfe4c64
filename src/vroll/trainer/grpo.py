"""``GRPOTrainer``: Group Relative Policy Optimization against a vLLM generation server.

Per generation batch: ``num_generations`` completions for each prompt, rewards from
every reward function, group-relative advantages; then ``num_iterations`` passes of the
clipped objective over it in micro-batches (see ``vroll.rl.losses.policy_loss``), with
the trainer/vLLM logprob mismatch corrected by importance sampling (``vroll.rl.importance``:
``--vllm_importance_sampling_mode``) and logged per completion length.

Micro-batches are ``per_device_train_batch_size`` rows, or with ``max_tokens_per_micro_batch``
each optimizer step's rows (its *window*) re-cut into the fewest micro-batches that fit the
token budget (``vroll.rl.packing``); then every micro-batch carries its window's normalizers, so
the step's loss and gradient are the window's as one batch for every loss type.

    trainer = GRPOTrainer(model="smollm2-135m", reward_funcs=["addition_correct"],
                          args=GRPOConfig(output_dir="runs/x", max_steps=50))
    trainer.train()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from vroll.rl.advantages import constant_groups, group_advantages
from vroll.rl.importance import importance_weights, mismatch_tallies
from vroll.rl.losses import LossOutput, Normalizers, policy_loss, rows_with_gradient
from vroll.rl.packing import even_out, spread, token_budget_partition
from vroll.trainer.base import OnlineTrainer, ScoredRollout
from vroll.trainer.bookkeeping.step_metrics import pooled
from vroll.trainer.config import GRPOConfig
from vroll.trainer.logps import (
    TokenBatch,
    batched_logps,
    completion_logps,
    mask_completions_with,
    pad_batch,
    server_logps_tensor,
)
from vroll.trainer.model.distributed import agree_max, reference_model
from vroll.vision import ImageCodec, rollout_vision


@dataclass
class GRPOMicroBatch:
    batch: TokenBatch
    advantages: torch.Tensor  # (B,)
    old_logps: torch.Tensor | None  # (B, C): None when on-policy (the current logps, detached)
    ref_logps: torch.Tensor | None  # (B, C): only when beta > 0
    sampling_logps: torch.Tensor | None  # (B, C): the generator's (vLLM's) logprobs
    # Completion tokens of the whole accumulation window over *all* processes, per micro-batch
    # slot: dapo divides by it, so N processes with DDP's gradient mean give one process's
    # gradient on the same batch.
    num_items: float
    # Rows and tokens of the micro-batch before its gradient-free rows were left out (``build``):
    # the grpo / dr_grpo and bnpo normalizers.
    num_sequences: int
    num_tokens: float
    # a token-budget micro-batch: its normalizers are its window's, so its loss is not a 1/GA share (a row
    # micro-batch's is, dapo's aside: PolicyLossConfig.step_share)
    window_normalized: bool = False
    dummy: bool = False  # one row with nothing in its loss: run so that every process makes as many passes


@dataclass
class _Part:
    """This process's share of a generation batch, as ``build`` cuts it into micro-batches."""

    batch: TokenBatch  # (B, P + C) on the device
    advantages: torch.Tensor  # (B,)
    sampling: list[list[float]] | None  # the generator's logprobs per row (importance sampling)
    num_items: float  # dapo's normalizer: the window's model tokens over all processes


class GRPOTrainer(OnlineTrainer):
    """GRPO (and Dr. GRPO, DAPO, GSPO through ``loss_type`` / ``importance_sampling_level``)."""

    args: GRPOConfig
    config_class = GRPOConfig
    state_types = (*OnlineTrainer.state_types, GRPOMicroBatch)  # its micro-batches, in a checkpoint cut mid-batch

    def setup_model(self, model: Any) -> None:
        self.image_codec = ImageCodec.for_model(model)  # None for a text-only policy
        self.set_loss_configs()
        self.ref_model = None
        if self.args.beta > 0:  # a frozen copy of the initial policy, for the KL term
            self.ref_model = reference_model(model, self.accelerator)  # ZeRO-3/FSDP2: sharded too

    def set_loss_configs(self) -> None:
        """The loss's settings from ``args``: a row micro-batch's share of the step (1/accumulation), and a
        token-budget one's, normalized over its whole window; and the importance-sampling correction. Called
        again where ``args`` changes."""
        self.loss_config = self.args.policy_loss_config()
        self.window_loss_config = dataclasses.replace(self.loss_config, accumulation_steps=1)
        self.sampling_correction = self.args.vllm_importance_sampling

    def uses_sampling_logprobs(self) -> bool:
        return self.args.vllm_importance_sampling_correction  # the IS weights are their only use

    def build(self, scored: ScoredRollout) -> list[GRPOMicroBatch] | list[list[GRPOMicroBatch]]:
        args, rollout = self.args, scored.rollout
        advantages = self.advantages(scored.rewards)  # (N,)
        lo, hi = self.my_slice(len(rollout.texts))
        batch = pad_batch(rollout.prompt_ids[lo:hi], rollout.completion_ids[lo:hi], self.tokenizer.pad_token_id,
                          rollout.completion_mask[lo:hi])  # environment tokens are not trained
        batch.vision = rollout_vision(self.image_codec, rollout, range(lo, hi))  # the images, checked
        if batch.vision is not None:
            mask_completions_with(batch, self.image_codec.image_token_id, self.tokenizer.pad_token_id)
        if args.mask_truncated_completions:
            keep = torch.tensor([not t for t in rollout.truncated[lo:hi]], dtype=torch.float32)
            batch.completion_mask *= keep[:, None]
        sampling = (rollout.sampling_logps[lo:hi] if rollout.sampling_logps is not None
                    and args.vllm_importance_sampling_correction else None)
        micro = args.per_device_train_batch_size
        starts = range(0, hi - lo, micro)
        kept = [sum(m) for m, t in zip(rollout.completion_mask, rollout.truncated, strict=True)  # model tokens
                if not (t and args.mask_truncated_completions)]
        num_items = sum(kept) / max(1, len(starts) * self.accelerator.num_processes) * args.gradient_accumulation_steps
        # on the device before the rows are taken: the micro-batches share one image-feature cache
        batch, advantages = batch.to(self.accelerator.device), advantages[lo:hi].to(self.accelerator.device)
        trainable = rows_with_gradient(advantages, batch.completion_mask, args.beta).tolist()  # (B,)
        part = _Part(batch, advantages, sampling, num_items)
        if args.max_tokens_per_micro_batch is not None:
            lengths = [(len(p), len(c)) for p, c in zip(rollout.prompt_ids[lo:hi], rollout.completion_ids[lo:hi],
                                                        strict=True)]
            return self._budget_steps(part, trainable, lengths)
        # rows whose loss term is exactly 0 with its gradient (rows_with_gradient) are never run
        return [self._micro_batch(part, [j for j in range(i, min(i + micro, hi - lo)) if trainable[j]],
                                  slice(i, i + micro)) for i in starts]

    def _budget_steps(self, part: _Part, trainable: list[bool],
                      lengths: list[tuple[int, int]]) -> list[list[GRPOMicroBatch]]:
        """Per micro-step, its micro-batches: each window (per_device_train_batch_size x
        gradient_accumulation_steps rows) cut into the fewest that fit ``max_tokens_per_micro_batch``, as many
        on every process (one all-reduce), spread over the window's micro-steps."""
        args = self.args
        ga, budget = args.gradient_accumulation_steps, args.max_tokens_per_micro_batch
        assert budget is not None
        size = args.per_device_train_batch_size * ga
        windows = [slice(w, min(w + size, len(part.batch))) for w in range(0, len(part.batch), size)]
        packed = self.forward_options.packed and part.batch.vision is None
        rows = [[i for i in range(w.start, w.stop) if trainable[i]] for w in windows]
        cuts = [token_budget_partition([lengths[i][0] for i in r], [lengths[i][1] for i in r], budget, packed=packed)
                for r in rows]
        counts = agree_max(self.accelerator, [max(1, len(c)) for c in cuts])  # a window with no row: one dummy
        steps: list[list[GRPOMicroBatch]] = []
        for window, r, cut, count in zip(windows, rows, cuts, counts, strict=True):
            cut = even_out(cut, count, [lengths[i][0] for i in r], [lengths[i][1] for i in r], packed=packed)
            shortest = min(range(window.start, window.stop), key=lambda i: (sum(lengths[i]), i))
            mbs = [self._micro_batch(part, [r[k] for k in c] or [shortest], window, budget=True, dummy=not c)
                   for c in cut]
            steps += spread(mbs, ga)
        return steps

    def _micro_batch(self, part: _Part, rows: list[int], span: slice, budget: bool = False,
                     dummy: bool = False) -> GRPOMicroBatch:
        """``rows`` of the batch, trimmed to their own width, carrying the normalizers of ``span`` (a row
        micro-batch's rows, or a token-budget micro-batch's window), so the rows left out (no gradient) or
        placed in other micro-batches change neither the loss nor the gradient.

        No rows: the span's first is run with its loss mask zeroed, as is a ``dummy``: every process runs the
        same number of forward and backward passes (DDP, ZeRO and FSDP reduce inside them).
        """
        dummy = dummy or not rows
        rows = rows or [span.start]
        full = part.batch.completion_mask[span]  # (span rows, C)
        mb = part.batch.select(rows).trimmed()
        if dummy and budget:
            mb.completion_mask = torch.zeros_like(mb.completion_mask)
        old, ref = self._reference_logps(mb, len(mb) if budget else self.args.per_device_train_batch_size)
        server = (None if part.sampling is None else server_logps_tensor(
            [part.sampling[i] for i in rows], mb.completion_ids.shape[1]).to(mb.input_ids.device))
        return GRPOMicroBatch(mb, part.advantages[rows], old, ref, server, part.num_items,
                              num_sequences=full.shape[0], num_tokens=float(full.sum()),
                              window_normalized=bool(budget), dummy=dummy and budget)

    def _reference_logps(self, batch: TokenBatch, micro: int) -> tuple[Any, Any]:
        """Old logps (needed once updates happen between generations) and reference logps, ``micro`` rows
        a forward."""
        args, options = self.args, self.forward_options
        off_policy = args.num_iterations > 1 or (args.steps_per_generation or 1) > args.gradient_accumulation_steps
        old = ref = None
        with self.accelerator.autocast():
            if off_policy:
                old = batched_logps(self.model, batch, micro, args.temperature, options)
            if self.ref_model is not None:
                ref = batched_logps(self.ref_model, batch, micro, args.temperature, options)
        return old, ref

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """(N,) advantage of each completion from the (N,) rewards of all of them."""
        return group_advantages(rewards, self.args.num_generations, self.args.scale_rewards)

    def metrics(self, scored: ScoredRollout) -> dict[str, float]:
        advantages = self.advantages(scored.rewards)
        return super().metrics(scored) | {
            # the groups that get exactly 0 advantage (and that dynamic sampling generates again for)
            "reward/frac_zero_std_groups": float(constant_groups(scored.rewards, self.args.num_generations)
                                                 .float().mean()),
            "advantage/abs_mean": float(advantages.abs().mean()),
            # completions with a gradient (rows_with_gradient, before truncation masking): the share of
            # the batch the training forward runs on
            "train/rows_with_gradient_frac": float(((advantages != 0) | (self.args.beta > 0)).float().mean())}

    def loss(self, model: torch.nn.Module, mb: GRPOMicroBatch) -> LossOutput:
        args = self.args
        need_raw = mb.sampling_logps is not None
        with self.accelerator.autocast():
            logps, raw = completion_logps(model, mb.batch, args.temperature, with_raw=need_raw,
                                          options=self.forward_options)
        mask = mb.batch.completion_mask  # (B, C)
        old = mb.old_logps if mb.old_logps is not None else logps.detach()
        is_weights, is_metrics = None, {}
        if need_raw:
            is_weights, is_metrics = importance_weights(raw, mb.sampling_logps, mask, self.sampling_correction)
            is_metrics |= pooled("", mismatch_tallies(raw, mb.sampling_logps, mask, is_weights))
        # a token-budget micro-batch carries its window's normalizers: no 1/GA share on top
        config = self.window_loss_config if mb.window_normalized else self.loss_config
        out = policy_loss(logps, old, mb.advantages, mask, config, ref_logps=mb.ref_logps,
                          is_weights=is_weights, norm=Normalizers(mb.num_items, mb.num_sequences, mb.num_tokens))
        return LossOutput(out.loss, out.metrics | {f"is/{k}": v for k, v in is_metrics.items()})
