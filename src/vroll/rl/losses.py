"""Policy-gradient and preference losses as pure, vectorised functions.

Shape conventions: B = sequences, T = completion tokens (padded), V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

# The one definition of each option set: configs type their fields with these (the flag
# parser turns a Literal into argparse choices) and the losses check against them.
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]
DPOLossType = Literal["sigmoid", "ipo"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = get_args(ImportanceSamplingLevel)
DPO_LOSS_TYPES: tuple[str, ...] = get_args(DPOLossType)


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and detached float metrics for logging."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyLossConfig:
    """How :func:`policy_loss` forms the clipped objective: the algorithm's settings, fixed for a run.

    ``accumulation_steps``: micro-batches summed into one optimizer step. The loss of each is its share
    of the step's: grpo, bnpo and dr_grpo normalize a micro-batch on its own and are divided by it;
    dapo's ``Normalizers.num_items`` already counts the whole step's tokens.
    """

    loss_type: LossType = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    importance_sampling_level: ImportanceSamplingLevel = "token"
    beta: float = 0.0  # weight of the k3 KL penalty to the reference log-probs; 0 disables it
    max_completion_length: int | None = None  # dr_grpo's constant length denominator
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"unknown importance_sampling_level {self.importance_sampling_level!r}; "
                             f"valid: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' requires max_completion_length")
        if self.epsilon_low < 0 or self.epsilon_high < 0 or self.beta < 0:
            raise ValueError(f"epsilon_low, epsilon_high and beta must be >= 0, got {self.epsilon_low}, "
                             f"{self.epsilon_high}, {self.beta}")
        if self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {self.accumulation_steps}")

    @property
    def step_share(self) -> float:
        """What a micro-batch's own normalized loss is multiplied by to be its share of the step's."""
        return 1.0 if self.loss_type == "dapo" else 1.0 / self.accumulation_steps


@dataclass(frozen=True)
class Normalizers:
    """The counts a micro-batch's loss divides by when it is a part of a larger batch; None: its own.

    ``num_items``: dapo's token count of the whole step (every process, every micro-batch);
    ``num_sequences`` / ``num_tokens``: rows (grpo, dr_grpo) and tokens (bnpo) of the batch these rows
    were taken from, when rows without gradient were left out (:func:`rows_with_gradient`).
    """

    num_items: float | None = None
    num_sequences: int | None = None
    num_tokens: float | None = None


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """Log-probabilities of the ``index`` tokens, without materialising a full (B, T, V) copy.

    Args:
        logits: (B, T, V) unnormalised scores.
        index: (B, T) token ids.

    Returns:
        (B, T) log p(index) in the dtype of ``logits``.
    """
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)  # (B, T)
        # Row loop: logsumexp over the whole batch at once would allocate another (B, T, V).
        logsumexp = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (B, T)
        return selected - logsumexp  # (B, T)
    # logsumexp subtraction loses too much precision in bf16/fp16, so normalise per row instead.
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):
        row_logps = F.log_softmax(row_logits, dim=-1)  # (T, V)
        rows.append(row_logps.gather(dim=-1, index=row_index.unsqueeze(-1)).squeeze(-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 if the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def _log_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str) -> Tensor:
    """Log importance ratio per token, (B, T), at token or sequence (GSPO) level."""
    # Padding is zeroed before exp: garbage there could overflow, and inf * 0 gives NaN grads.
    padding = ~mask.bool()  # (B, T)
    if level == "token":
        return (logps - old_logps).masked_fill(padding, 0.0)  # (B, T)
    # GSPO: the value is the length-normalised sequence log-ratio, while the gradient of each
    # token is that of its own logp (scaled by the sequence ratio after exp).
    detached = logps.detach()  # (B, T)
    token = (detached - old_logps).masked_fill(padding, 0.0)  # (B, T)
    seq = token.sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
    return (logps - detached + seq.unsqueeze(-1)).masked_fill(padding, 0.0)  # (B, T)


def _aggregate(per_token: Tensor, mask: Tensor, config: PolicyLossConfig, norm: Normalizers) -> Tensor:
    """Reduce (B, T) per-token losses to a scalar according to ``config.loss_type``.

    The counts in ``norm`` default to this batch's B and token count; given, they are those of the
    batch the rows were taken from, so the loss and its gradient are the whole batch's.
    """
    masked = per_token * mask  # (B, T)
    rows = per_token.shape[0] if norm.num_sequences is None else norm.num_sequences
    if config.loss_type == "grpo":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
        return per_seq.sum() / rows
    if config.loss_type == "bnpo":
        return masked.sum() / (mask.sum().clamp(min=1.0) if norm.num_tokens is None else max(norm.num_tokens, 1.0))
    if config.loss_type == "dr_grpo":
        assert config.max_completion_length is not None  # PolicyLossConfig checks it
        # A constant denominator removes the length bias of per-sequence normalisation.
        return masked.sum() / (rows * config.max_completion_length)
    # dapo: the caller's global token count keeps grad accumulation / multi-process exact.
    denom = norm.num_items if norm.num_items is not None else mask.sum().clamp(min=1.0)
    return masked.sum() / denom


def rows_with_gradient(advantages: Tensor, mask: Tensor, beta: float) -> Tensor:
    """(B,) True for the sequences whose term of :func:`policy_loss` can have a gradient.

    Every token's clipped term is ``-min(r * A, clip(r) * A)``, exactly 0 with its gradient when the
    sequence's advantage A is 0 (a group whose rewards are all equal: late in a run most of them);
    a sequence with no token in ``mask`` (truncated and masked) adds nothing at all. With ``beta``
    > 0 the KL term still pulls zero-advantage tokens, so only empty rows are gradient-free.
    Left out of the forward pass, with the whole batch's normalizers given to ``policy_loss``, they
    cost nothing and change nothing.

    Args:
        advantages: (B,) one advantage per sequence.
        mask: (B, T) 1 for completion tokens that count.
        beta: the KL coefficient.
    """
    has_tokens = mask.sum(-1) > 0  # (B,)
    return has_tokens if beta > 0 else has_tokens & (advantages != 0)


def _check_policy_inputs(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, **optional: Tensor | None
) -> None:
    """Raise ValueError on shape mismatches, which would otherwise broadcast silently."""
    if logps.dim() != 2:
        raise ValueError(f"logps must be (B, T), got shape {tuple(logps.shape)}")
    named = {"old_logps": old_logps, "mask": mask, **optional}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != logps.shape:
            raise ValueError(
                f"{name} must have the shape of logps {tuple(logps.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
    if advantages.shape != (logps.shape[0],):
        raise ValueError(
            f"advantages must be ({logps.shape[0]},), got shape {tuple(advantages.shape)}"
        )


def _clip_metrics(
    ratio: Tensor, adv: Tensor, mask: Tensor, epsilon_low: float, epsilon_high: float
) -> dict[str, float]:
    """Fractions of masked tokens whose update is cut off by the lower / upper clip bound."""
    low = ((ratio < 1.0 - epsilon_low) & (adv < 0)).to(mask.dtype)  # (B, T)
    high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).to(mask.dtype)  # (B, T)
    low_frac = _masked_mean(low, mask).item()
    high_frac = _masked_mean(high, mask).item()
    return {
        "clip_ratio_low": low_frac,
        "clip_ratio_high": high_frac,
        "clip_ratio": low_frac + high_frac,  # the two regions are disjoint
    }


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: PolicyLossConfig = PolicyLossConfig(),
    *,
    ref_logps: Tensor | None = None,
    is_weights: Tensor | None = None,
    norm: Normalizers = Normalizers(),
) -> LossOutput:
    """Clipped policy-gradient loss (GRPO / BNPO / Dr. GRPO / DAPO, token or GSPO ratios).

    Args:
        logps: (B, T) current policy log-probs of the completion tokens (with grad).
        old_logps: (B, T) log-probs of the policy that sampled (no grad).
        advantages: (B,) one advantage per sequence.
        mask: (B, T) 1 for completion tokens, 0 for padding.
        config: the loss's settings. Aggregation: "grpo" (per-sequence mean, then mean), "bnpo"
            (token mean over the batch), "dr_grpo" (sum / (B * max_completion_length)), "dapo" (sum /
            ``norm.num_items``, defaulting to the local token count); clip range [1 - epsilon_low,
            1 + epsilon_high] of the ratio; "token" (PPO/GRPO) or "sequence" (GSPO) ratios.
        ref_logps: (B, T) reference log-probs, needed when ``config.beta`` > 0.
        is_weights: (B, T) detached importance weights for the trainer/vLLM mismatch
            (:func:`vroll.rl.importance.importance_weights`).
        norm: the counts of the larger batch these rows are part of (see :class:`Normalizers`).

    Returns:
        LossOutput with this micro-batch's share of the step's loss (``config.step_share``) and
        clip / KL / IS metrics.
    """
    if config.beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 requires ref_logps")
    _check_policy_inputs(logps, old_logps, advantages, mask, ref_logps=ref_logps, is_weights=is_weights)
    mask = mask.to(logps.dtype)  # (B, T)
    adv = advantages.to(logps.dtype).unsqueeze(-1)  # (B, 1)
    ratio = torch.exp(_log_ratio(logps, old_logps, mask, config.importance_sampling_level))  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - config.epsilon_low, 1.0 + config.epsilon_high)  # (B, T)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    metrics = _clip_metrics(ratio.detach(), adv, mask, config.epsilon_low, config.epsilon_high)
    if is_weights is not None:
        per_token = per_token * is_weights  # (B, T)
        metrics["is_ratio"] = _masked_mean(is_weights.detach(), mask).item()
    if config.beta > 0:
        assert ref_logps is not None  # checked above; narrows the type for mypy
        delta = (ref_logps - logps).masked_fill(~mask.bool(), 0.0)  # (B, T)
        kl = torch.exp(delta) - delta - 1.0  # (B, T) k3 estimator: unbiased and >= 0
        per_token = per_token + config.beta * kl  # (B, T)
        metrics["kl"] = _masked_mean(kl.detach(), mask).item()
    loss = _aggregate(per_token, mask, config, norm) * config.step_share
    return LossOutput(loss=loss, metrics=metrics)


def online_dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    pair_mask: Tensor | None = None,
) -> LossOutput:
    """DPO loss on (chosen, rejected) pairs ranked online by a reward function / judge.

    Args:
        chosen_logps, rejected_logps: (B,) summed completion log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference model.
        beta: inverse temperature of the implicit reward.
        loss_type: "sigmoid" (DPO) or "ipo".
        pair_mask: (B,) 1 for pairs that count (e.g. not tied); the loss averages over those.

    Returns:
        LossOutput with the mean loss and rewards/{chosen,rejected,margin,accuracy} metrics.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_ratio = chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = rejected_logps - ref_rejected_logps  # (B,)
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(logits)  # (B,)
    else:
        # IPO regresses the unscaled log-ratio gap to 1/(2*beta) instead of pushing it to inf.
        per_pair = (logits / beta - 1.0 / (2.0 * beta)) ** 2  # (B,)
    mask = torch.ones_like(per_pair) if pair_mask is None else pair_mask.to(per_pair.dtype)  # (B,)
    loss = _masked_mean(per_pair, mask)
    chosen_rewards = beta * chosen_ratio.detach()  # (B,)
    rejected_rewards = beta * rejected_ratio.detach()  # (B,)
    metrics = {
        "rewards/chosen": _masked_mean(chosen_rewards, mask).item(),
        "rewards/rejected": _masked_mean(rejected_rewards, mask).item(),
        "rewards/margin": _masked_mean(chosen_rewards - rejected_rewards, mask).item(),
        "rewards/accuracy": _masked_mean((chosen_rewards > rejected_rewards).float(), mask).item(),
    }
    return LossOutput(loss=loss, metrics=metrics)
