"""Group-relative advantages and reward combination for GRPO-style training."""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch
from torch import Tensor

AdvantageScale = Literal["group", "batch", "none"]
ADVANTAGE_SCALES: tuple[str, ...] = get_args(AdvantageScale)


def group_advantages(
    rewards: Tensor, num_generations: int, scale: AdvantageScale = "group", eps: float = 1e-4
) -> Tensor:
    """Compute group-relative advantages.

    Args:
        rewards: (B*G,) rewards, ordered as G consecutive completions per prompt.
        num_generations: G, the number of completions per prompt.
        scale: "group" divides by each group's std, "batch" by the std of all rewards in the
            batch (more robust when groups are nearly constant), "none" keeps the centred
            rewards (Dr. GRPO, which argues std scaling biases towards easy/hard prompts).
        eps: added to the std so constant groups give 0 instead of NaN.

    Returns:
        (B*G,) advantages: reward minus its group mean, optionally scaled; exactly 0 for every
        completion of a group whose rewards are all equal (the float mean of seven 0.1s is not
        0.1, and a stray 1e-17 / eps would mark rows without signal as trainable).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    n = rewards.numel()
    if n % num_generations != 0:
        raise ValueError(
            f"number of rewards ({n}) is not divisible by num_generations ({num_generations})"
        )
    rewards = rewards.float()
    grouped = rewards.view(-1, num_generations)  # (B, G)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # (B*G,)
    if scale == "group":  # Bessel-corrected std like TRL; with a single sample there is no spread
        correction = 1 if num_generations > 1 else 0
        advantages = advantages / (grouped.std(dim=1, correction=correction).repeat_interleave(num_generations) + eps)
    elif scale == "batch":
        advantages = advantages / (rewards.std(correction=1 if n > 1 else 0) + eps)
    return advantages.masked_fill(constant_groups(rewards, num_generations).repeat_interleave(num_generations), 0.0)


def constant_groups(rewards: Tensor, num_generations: int) -> Tensor:
    """(B,) True for each group of ``num_generations`` consecutive (B*G,) rewards that are all equal:
    its advantages are 0 and it gives no learning signal (dynamic sampling generates again for it)."""
    grouped = rewards.view(-1, num_generations)  # (B, G)
    return (grouped == grouped[:, :1]).all(dim=1)


def leave_one_out_advantages(rewards: Tensor, k: int) -> Tensor:
    """RLOO advantages: each reward minus the mean of the other ``k - 1`` rewards of its prompt.

    Args:
        rewards: (B*k,) prompt-major rewards (k completions per prompt).
        k: completions per prompt, >= 2.

    Returns:
        (B*k,) r_i - mean_{j != i} r_j, which equals (r_i - mean) * k / (k - 1); exactly 0 for a
        group whose rewards are all equal.
    """
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"need k >= 2 completions per prompt dividing {rewards.numel()} rewards, got k={k}")
    grouped = rewards.float().view(-1, k)  # (B, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # (B, k)
    return (grouped - baseline).view(-1).masked_fill(constant_groups(rewards, k).repeat_interleave(k), 0.0)  # exact 0


def combine_rewards(per_func: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of per-function rewards, ignoring NaN ("not applicable") entries.

    Args:
        per_func: (B, F) rewards; NaN where a function returned None for a sample.
        weights: (F,) weight per reward function.

    Returns:
        (B,) total reward. Rows where every function returned None get 0 (with a warning).
    """
    if per_func.dim() != 2:
        raise ValueError(f"per_func must be 2-D (B, F), got shape {tuple(per_func.shape)}")
    if weights.shape != (per_func.shape[1],):
        raise ValueError(
            f"weights must have shape ({per_func.shape[1]},), got {tuple(weights.shape)}"
        )
    weighted = per_func * weights.to(per_func.dtype).unsqueeze(0)  # (B, F)
    all_nan = torch.isnan(per_func).all(dim=1)  # (B,)
    if bool(all_nan.any()):
        # Constant message so Python's default warning filter shows it only once.
        warnings.warn(
            "every reward function returned None for some samples; their reward is set to 0",
            RuntimeWarning,
            stacklevel=2,
        )
    return torch.nansum(weighted, dim=1)  # (B,)
