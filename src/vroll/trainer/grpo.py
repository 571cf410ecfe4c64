"""``GRPOTrainer``: Group Relative Policy Optimization against a vLLM generation server.

Per generation batch: ``num_generations`` completions for each prompt, rewards from
every reward function, group-relative advantages; then ``num_iterations`` passes of the
clipped objective over it in micro-batches (see ``vroll.rl.losses.policy_loss``), with
the trainer/vLLM logprob mismatch corrected by truncated importance sampling.

    trainer = GRPOTrainer(model="smollm2-135m", reward_funcs=["addition_correct"],
                          args=GRPOConfig(output_dir="runs/x", max_steps=50))
    trainer.train()
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from vroll.rl.advantages import group_advantages
from vroll.rl.losses import policy_loss, truncated_is_weights
from vroll.trainer.base import OnlineTrainer
from vroll.trainer.config import GRPOConfig
from vroll.trainer.policy import TokenBatch, batched_logps, completion_logps, pad_batch, server_logps_tensor
from vroll.trainer.rollout import Rollout


@dataclass
class GRPOMicroBatch:
    batch: TokenBatch
    advantages: torch.Tensor  # (B,)
    old_logps: torch.Tensor | None  # (B, C): None when on-policy (the current logps, detached)
    ref_logps: torch.Tensor | None  # (B, C): only when beta > 0
    sampling_logps: torch.Tensor | None  # (B, C): the generator's (vLLM's) logprobs


@dataclass
class GRPOBuffer:
    micro_batches: list[GRPOMicroBatch]
    metrics: dict[str, float] = field(default_factory=dict)
    tokens_per_micro: float = 1.0


class GRPOTrainer(OnlineTrainer):
    """GRPO (and Dr. GRPO, DAPO, GSPO through ``loss_type`` / ``importance_sampling_level``)."""

    args: GRPOConfig
    config_class = GRPOConfig

    def validate(self, num_processes: int) -> None:
        self.args.validate(num_processes)

    def setup_model(self, model: Any) -> None:
        self.ref_model = None
        if self.args.beta > 0:  # a frozen copy of the initial policy, for the KL term
            self.ref_model = copy.deepcopy(model).to(self.accelerator.device).eval().requires_grad_(False)

    def prompts_per_generation(self) -> int:
        return self.args.generation_batch_size(self.accelerator.num_processes) // self.args.num_generations

    def completions_per_prompt(self) -> int:
        return self.args.num_generations

    def micro_steps_per_generation(self) -> int:
        assert self.args.steps_per_generation is not None
        return self.args.steps_per_generation * self.args.num_iterations

    # ------------------------------------------------------------------ buffer

    def make_buffer(self, rows: list[dict], rollout: Rollout, rewards: torch.Tensor,
                    per_func: torch.Tensor, timings: dict[str, float]) -> GRPOBuffer:
        args = self.args
        advantages = group_advantages(rewards, args.num_generations, args.scale_rewards)  # (N,)
        lo, hi = self.my_slice(len(rollout.texts))
        device = self.accelerator.device
        batch = pad_batch(rollout.prompt_ids[lo:hi], rollout.completion_ids[lo:hi], self.tokenizer.pad_token_id)
        if args.mask_truncated_completions:
            keep = torch.tensor([not t for t in rollout.truncated[lo:hi]], dtype=torch.float32)
            batch.completion_mask *= keep[:, None]
        batch, advantages = batch.to(device), advantages.to(device)
        width = batch.completion_ids.shape[1]
        sampling = (server_logps_tensor(rollout.sampling_logps[lo:hi], width).to(device)
                    if rollout.sampling_logps is not None and args.vllm_importance_sampling_correction else None)
        old, ref = self._reference_logps(batch, timings)
        micro = args.per_device_train_batch_size
        mbs = [GRPOMicroBatch(batch.select(slice(i, i + micro)), advantages[lo:hi][i : i + micro],
                              None if old is None else old[i : i + micro],
                              None if ref is None else ref[i : i + micro],
                              None if sampling is None else sampling[i : i + micro])
               for i in range(0, hi - lo, micro)]
        # Token count per micro-batch over *all* processes' completions: dapo divides by it,
        # so N processes with DDP's gradient mean give one process's gradient on the same batch.
        kept = [len(c) for c, t in zip(rollout.completion_ids, rollout.truncated, strict=True)
                if not (t and args.mask_truncated_completions)]
        tokens = sum(kept) / max(1, len(mbs) * self.accelerator.num_processes)
        return GRPOBuffer(mbs, self._rollout_metrics(rollout, rewards, per_func, advantages), tokens)

    def _reference_logps(self, batch: TokenBatch, timings: dict[str, float]) -> tuple[Any, Any]:
        """Old logps (needed once updates happen between generations) and reference logps."""
        import time

        args, start = self.args, time.perf_counter()
        off_policy = args.num_iterations > 1 or (args.steps_per_generation or 1) > args.gradient_accumulation_steps
        old = ref = None
        micro = args.per_device_train_batch_size
        with self.accelerator.autocast():
            if off_policy:
                old = batched_logps(self.model, batch, micro, args.temperature)
            if self.ref_model is not None:
                ref = batched_logps(self.ref_model, batch, micro, args.temperature)
        timings["time/train_s"] += time.perf_counter() - start
        return old, ref

    def _rollout_metrics(self, rollout: Rollout, rewards: torch.Tensor, per_func: torch.Tensor,
                         advantages: torch.Tensor) -> dict[str, float]:
        groups = rewards.view(-1, self.args.num_generations)
        return self.rollout_metrics(rollout, rewards, per_func) | {
            "reward/frac_zero_std_groups": float((groups.std(-1) < 1e-6).float().mean()),
            "advantage/abs_mean": float(advantages.abs().mean())}

    # ------------------------------------------------------------------ loss

    def micro_step(self, mb: GRPOMicroBatch) -> dict[str, float]:
        args = self.args
        need_raw = mb.sampling_logps is not None
        with self.accelerator.autocast():
            logps, raw = completion_logps(self.model, mb.batch, args.temperature, with_raw=need_raw)
        mask = mb.batch.completion_mask  # (B, C)
        old = mb.old_logps if mb.old_logps is not None else logps.detach()
        is_weights, metrics = None, {}
        if need_raw:
            is_weights, metrics = truncated_is_weights(raw, mb.sampling_logps, mask,
                                                       args.vllm_importance_sampling_cap)
        num_items = self.buffer.tokens_per_micro * args.gradient_accumulation_steps
        out = policy_loss(logps, old, mb.advantages, mask, loss_type=args.loss_type, epsilon_low=args.epsilon,
                          epsilon_high=args.epsilon_high, importance_sampling_level=args.importance_sampling_level,
                          beta=args.beta, ref_logps=mb.ref_logps, is_weights=is_weights,
                          max_completion_length=args.max_completion_length, num_items_in_batch=num_items)
        # dapo is already normalized by the accumulation window's token count
        scale = 1.0 if args.loss_type == "dapo" else 1.0 / args.gradient_accumulation_steps
        self.accelerator.backward(out.loss * scale)
        # logged as backpropagated, summed over the accumulation window: one number per step,
        # the same for any split of the batch over processes and micro-steps
        loss = out.loss.item() * scale * args.gradient_accumulation_steps
        return {"loss": loss, **out.metrics, **{f"is/{k}": v for k, v in metrics.items()}}
