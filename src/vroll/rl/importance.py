"""Importance weights against the sampler: the trainer/vLLM logprob mismatch, TRL 1.16's four corrections.

vLLM samples the completions with its own numerics (other kernels and reduction orders, bf16 where the
trainer keeps fp32 master weights; in async mode also older weights), so the tokens come from the
sampler's distribution, not from the policy the trainer differentiates. Per token the mismatch is
small, but a sequence's ratio is a product over its tokens: its log is the *sum* of the per-token
log-ratios, and at 4K-8K tokens that sum drifts far from 0 (issue 29).

With r_t = pi_trainer(y_t) / pi_sampler(y_t) and bounds [C_min, C_max] (TRL's
``vllm_importance_sampling_mode``, ``_clip_min``, ``_clip_max``), the weight of token t is:

- ``token_truncate``: clamp(r_t, C_min, C_max) (TIS; verl's token-level ``rollout_is``);
- ``token_mask``: r_t inside the bounds, 0 outside (the token drops out of the loss);
- ``sequence_truncate``: clamp(R, C_min, C_max) for every token of the sequence, R = exp(sum_t log r_t);
- ``sequence_mask``: R inside the bounds, 0 outside (the whole sequence drops out).

Truncation bounds the weights' variance and keeps every token, biased; masking keeps the kept ones
unbiased and drops the outliers (and with them their gradient). Sequence ratios are the exact
correction for a sequence-level objective, but their variance grows with length.

Shape conventions: B = sequences, T = completion tokens (padded).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

ImportanceSamplingMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
IMPORTANCE_SAMPLING_MODES: tuple[str, ...] = get_args(ImportanceSamplingMode)
# how TRL and vroll's trainers spell these settings (--vllm_importance_sampling_mode, ...): the errors name them
FLAG_PREFIX = "vllm_importance_sampling_"
# completion lengths (model tokens) where the mismatch metrics split: short answers, 1K-2K, the 2K-8K of
# reasoning runs, and beyond; a factor 4 apart, so that a drift that grows with length shows
LENGTH_BUCKETS: tuple[int, ...] = (512, 2048, 8192)
_SHOWN_LOG_MAX = 50.0  # a logged ratio is at most e^50: a wild outlier does not log inf


@dataclass(frozen=True)
class SamplingCorrection:
    """How the trainer/sampler importance weights are bounded (TRL's ``vllm_importance_sampling_*``).

    ``clip_max`` / ``clip_min``: None (or inf / 0) is no bound on that side. The bounds must hold 1, the
    ratio of a token on which trainer and sampler agree exactly; a truncating mode needs one of them.
    """

    mode: ImportanceSamplingMode = field(default="token_truncate", metadata={
        "help": "token_truncate, token_mask, sequence_truncate or sequence_mask: clamp (truncate) or zero (mask) "
                "the trainer/vLLM ratio outside [clip_min, clip_max], per token or per sequence (the exp of the "
                "sequence's summed token log-ratios)"})
    clip_max: float | None = field(default=2.0, metadata={
        "help": "upper bound of the trainer/vLLM ratio (inf: none)"})
    clip_min: float | None = field(default=None, metadata={
        "help": "lower bound of the trainer/vLLM ratio (default: none)"})

    def __post_init__(self) -> None:
        if self.mode not in IMPORTANCE_SAMPLING_MODES:
            raise ValueError(f"unknown {FLAG_PREFIX}mode {self.mode!r}; valid: {', '.join(IMPORTANCE_SAMPLING_MODES)}")
        low, high = self.bounds
        if not low <= 1.0 <= high:
            raise ValueError(f"{FLAG_PREFIX}clip_min ({self.clip_min}) must be <= 1 <= {FLAG_PREFIX}clip_max "
                             f"({self.clip_max}): a token on which trainer and vLLM agree has ratio 1")
        if low >= high:
            raise ValueError(f"{FLAG_PREFIX}clip_min ({self.clip_min}) must be below {FLAG_PREFIX}clip_max "
                             f"({self.clip_max})")
        if self.mode.endswith("truncate") and low == 0.0 and high == math.inf:
            raise ValueError(f"{FLAG_PREFIX}mode {self.mode!r} needs a bound to truncate at: set "
                             f"{FLAG_PREFIX}clip_max (or {FLAG_PREFIX}clip_min)")

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high): the clip bounds, 0 and inf where unset."""
        return (0.0 if self.clip_min is None else self.clip_min,
                math.inf if self.clip_max is None else self.clip_max)

    @property
    def level(self) -> str:
        """"token" or "sequence"."""
        return self.mode.split("_")[0]


class Tally(NamedTuple):
    """A metric as a sum and a count, so that micro-batches and processes pool into one exact mean."""

    total: float
    count: float


# ---------------------------------------------------------------- the four modes


def token_ratios(log_ratio: Tensor) -> Tensor:
    """(B, T) r_t = exp(log r_t) from the (B, T) per-token log-ratios."""
    return torch.exp(log_ratio)


def sequence_ratios(log_ratio: Tensor) -> Tensor:
    """(B, 1) R = exp(sum_t log r_t) from the (B, T) per-token log-ratios, which are 0 at padding."""
    return torch.exp(log_ratio.sum(-1, keepdim=True))


def _mask_outside(ratio: Tensor, low: float, high: float) -> Tensor:
    """``ratio`` where it lies in [low, high], else 0 (any shape)."""
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def token_truncate(log_ratio: Tensor, low: float, high: float) -> Tensor:
    """(B, T) weights: each token's ratio clamped to [low, high]. ``log_ratio``: (B, T), 0 at padding."""
    return token_ratios(log_ratio).clamp(low, high)


def token_mask(log_ratio: Tensor, low: float, high: float) -> Tensor:
    """(B, T) weights: each token's ratio, 0 where it lies outside [low, high]."""
    return _mask_outside(token_ratios(log_ratio), low, high)


def sequence_truncate(log_ratio: Tensor, low: float, high: float) -> Tensor:
    """(B, T) weights: the sequence's ratio clamped to [low, high], on each of its tokens."""
    return sequence_ratios(log_ratio).clamp(low, high).expand_as(log_ratio)


def sequence_mask(log_ratio: Tensor, low: float, high: float) -> Tensor:
    """(B, T) weights: the sequence's ratio on each of its tokens, 0 on all of them where it lies outside."""
    return _mask_outside(sequence_ratios(log_ratio), low, high).expand_as(log_ratio)


MODES: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "token_truncate": token_truncate, "token_mask": token_mask,
    "sequence_truncate": sequence_truncate, "sequence_mask": sequence_mask}


# ---------------------------------------------------------------- weights and metrics


def _log_ratio(trainer_logps: Tensor, sampler_logps: Tensor, mask: Tensor) -> Tensor:
    """(B, T) detached fp32 log r_t, 0 at padding (so a sequence's sum is over its tokens only)."""
    if not trainer_logps.shape == sampler_logps.shape == mask.shape:
        raise ValueError("trainer_logps, sampler_logps and mask must share a shape, got "
                         f"{tuple(trainer_logps.shape)}, {tuple(sampler_logps.shape)}, {tuple(mask.shape)}")
    return (trainer_logps.detach() - sampler_logps.detach()).float().masked_fill(~mask.bool(), 0.0)


def importance_weights(trainer_logps: Tensor, sampler_logps: Tensor, mask: Tensor,
                       correction: SamplingCorrection = SamplingCorrection()) -> tuple[Tensor, dict[str, float]]:
    """Importance weights correcting for the trainer/sampler mismatch, in ``correction.mode``.

    Args:
        trainer_logps: (B, T) log-probs of the sampled tokens recomputed by the trainer.
        sampler_logps: (B, T) log-probs the sampler (vLLM) reported for them.
        mask: (B, T) 1 for completion tokens.
        correction: the mode and its bounds.

    Returns:
        (B, T) detached weights (1.0 at padding) and metrics of the *unbounded* ratios at the mode's level
        (tokens, or sequences with a token): is_ratio_mean, is_ratio_min, is_ratio_max, and is_clipped_frac
        (the share outside [clip_min, clip_max]: truncated or masked).

    This is TRL's ``vllm_importance_sampling_correction``: the sampler's logprobs are the behaviour policy, so
    the same weights correct the numerics mismatch and, in async mode, samples drawn with older weights.
    """
    log_ratio = _log_ratio(trainer_logps, sampler_logps, mask)  # (B, T)
    valid = mask.bool()  # (B, T)
    low, high = correction.bounds
    weights = torch.where(valid, MODES[correction.mode](log_ratio, low, high), 1.0)  # (B, T)
    if correction.level == "sequence":
        unit_log, units = log_ratio.sum(-1), valid.any(-1)  # (B,), (B,)
    else:
        unit_log, units = log_ratio, valid  # (B, T), (B, T)
    ratio = torch.exp(unit_log)  # may be inf: compared, never logged
    shown = torch.exp(unit_log.clamp(max=_SHOWN_LOG_MAX))
    outside = ((ratio < low) | (ratio > high)) & units
    count = units.sum().clamp(min=1)
    stats = torch.stack([shown[units].sum() / count, shown.masked_fill(~units, math.inf).min(),
                         shown.masked_fill(~units, 0.0).max(), outside.sum() / count]).tolist()
    if not units.any():
        stats = [1.0, 1.0, 1.0, 0.0]
    keys = ("is_ratio_mean", "is_ratio_min", "is_ratio_max", "is_clipped_frac")
    return weights.to(trainer_logps.dtype), dict(zip(keys, stats, strict=True))


def length_bucket_names() -> list[str]:
    """The names of :data:`LENGTH_BUCKETS`' intervals: lt512, 512_2k, 2k_8k, ge8k."""
    def short(n: int) -> str:
        return f"{n // 1024}k" if n % 1024 == 0 else str(n)

    edges = LENGTH_BUCKETS
    return ([f"lt{short(edges[0])}"] + [f"{short(a)}_{short(b)}" for a, b in pairwise(edges)]
            + [f"ge{short(edges[-1])}"])


def mismatch_tallies(trainer_logps: Tensor, sampler_logps: Tensor, mask: Tensor,
                     weights: Tensor) -> dict[str, Tally]:
    """How far the trainer is from the sampler, overall and per completion length, and what the weights drop.

    Args:
        trainer_logps, sampler_logps, mask: (B, T) as for :func:`importance_weights`.
        weights: (B, T) the weights it returned.

    Returns:
        Sums and counts (pooled over micro-batches and processes by the caller): ``mismatch_k3_kl``, the
        per-token mean of the k3 estimator r - 1 - log r of KL(sampler || trainer) (verl's
        ``rollout_corr/k3_kl``; >= 0, unbiased on the sampler's tokens); ``masked_token_frac`` and
        ``masked_seq_frac``, the shares of tokens and of sequences (with a token) whose weight is 0; and
        ``mismatch_k3_kl/<bucket>``, ``masked_token_frac/<bucket>`` over the sequences whose length (tokens in
        ``mask``) lies in each of :data:`LENGTH_BUCKETS`' intervals (a bucket without tokens has count 0).
    """
    # fp64 and expm1: at the ~1e-3 per-token mismatch of bf16 runs k3 ~ x^2 / 2 is ~5e-7, where fp32's
    # e^x - 1 - x is noise
    log_ratio = _log_ratio(trainer_logps, sampler_logps, mask).clamp(max=_SHOWN_LOG_MAX).double()  # (B, T)
    valid = mask.bool()  # (B, T)
    k3 = (torch.expm1(log_ratio) - log_ratio).masked_fill(~valid, 0.0)  # (B, T)
    zero = (weights == 0) & valid  # (B, T)
    lengths = valid.sum(-1)  # (B,)
    rows = lengths > 0  # (B,)
    dropped = rows & (zero.sum(-1) == lengths)  # (B,)
    sums = [k3.sum(), valid.sum(), zero.sum(), dropped.sum(), rows.sum()]
    edges = (0, *LENGTH_BUCKETS, math.inf)
    for low, high in pairwise(edges):
        tokens = valid & ((lengths >= low) & (lengths < high)).unsqueeze(-1)  # (B, T)
        sums += [(k3 * tokens).sum(), tokens.sum(), (zero & tokens).sum()]
    v = torch.stack([s.double() for s in sums]).tolist()
    out = {"mismatch_k3_kl": Tally(v[0], v[1]), "masked_token_frac": Tally(v[2], v[1]),
           "masked_seq_frac": Tally(v[3], v[4])}
    for i, name in enumerate(length_bucket_names()):
        k3_sum, n, masked = v[5 + 3 * i: 8 + 3 * i]
        out |= {f"mismatch_k3_kl/len_{name}": Tally(k3_sum, n), f"masked_token_frac/len_{name}": Tally(masked, n)}
    return out
