"""Importance weights against the sampler (TRL 1.16's four modes) and the mismatch metrics, by hand."""

import math

import pytest
import torch

from vroll.rl.importance import (
    IMPORTANCE_SAMPLING_MODES,
    MODES,
    SamplingCorrection,
    importance_weights,
    length_bucket_names,
    mismatch_tallies,
)
from vroll.rl.losses import PolicyLossConfig, policy_loss
from vroll.trainer.bookkeeping.step_metrics import combine, pooled, pooled_means


def _k3(r: float) -> float:
    return r - 1.0 - math.log(r)


def _case():
    """Row 0: token ratios 1.5, 3, 0.5 (sequence ratio 2.25); row 1: 0.8, 1.25 and padding (sequence 1.0).
    The sampler's logprobs are 0, so the trainer's are the log-ratios; the padding holds garbage."""
    trainer = torch.log(torch.tensor([[1.5, 3.0, 0.5], [0.8, 1.25, 1e6]]))
    return trainer, torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


BOUNDS = SamplingCorrection(clip_min=0.6, clip_max=2.0)


@pytest.mark.parametrize(("mode", "expected"), [
    ("token_truncate", [[1.5, 2.0, 0.6], [0.8, 1.25, 1.0]]),
    ("token_mask", [[1.5, 0.0, 0.0], [0.8, 1.25, 1.0]]),
    ("sequence_truncate", [[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]),
    ("sequence_mask", [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]),
])
def test_each_mode_by_hand(mode, expected):
    trainer, sampler, mask = _case()
    correction = SamplingCorrection(mode=mode, clip_min=0.6, clip_max=2.0)
    weights, metrics = importance_weights(trainer.requires_grad_(), sampler, mask, correction)
    torch.testing.assert_close(weights, torch.tensor(expected))  # padding: 1.0, whatever it held
    assert not weights.requires_grad
    if mode.startswith("token"):  # the five tokens' ratios; 3 and 0.5 lie outside [0.6, 2]
        assert metrics["is_ratio_mean"] == pytest.approx((1.5 + 3.0 + 0.5 + 0.8 + 1.25) / 5)
        assert (metrics["is_ratio_min"], metrics["is_ratio_max"]) == pytest.approx((0.5, 3.0))
        assert metrics["is_clipped_frac"] == pytest.approx(2 / 5)
    else:  # the two sequences' ratios: 2.25 (outside) and 1.0
        assert metrics["is_ratio_mean"] == pytest.approx((2.25 + 1.0) / 2)
        assert (metrics["is_ratio_min"], metrics["is_ratio_max"]) == pytest.approx((1.0, 2.25))
        assert metrics["is_clipped_frac"] == pytest.approx(1 / 2)


def test_sequence_ratios_compound_with_length_where_token_ones_do_not():
    """Eight tokens each 1.2x likelier under the trainer: every token ratio lies inside [0.5, 2], the
    sequence's is 1.2^8 = 4.3. Token masking keeps them all, sequence masking drops the row. The second row's
    outliers cancel (3 x 1/3): token masking drops both tokens, sequence masking keeps the row."""
    trainer = torch.log(torch.tensor([[1.2] * 8, [3.0, 1 / 3] + [1.0] * 6]))
    mask, sampler = torch.ones(2, 8), torch.zeros(2, 8)
    token, _ = importance_weights(trainer, sampler, mask, SamplingCorrection("token_mask", 2.0, 0.5))
    sequence, _ = importance_weights(trainer, sampler, mask, SamplingCorrection("sequence_mask", 2.0, 0.5))
    torch.testing.assert_close(token[0], torch.full((8,), 1.2))
    torch.testing.assert_close(sequence[0], torch.zeros(8))
    assert token[1, :2].tolist() == [0.0, 0.0] and (token[1, 2:] == 1.0).all()
    torch.testing.assert_close(sequence[1], torch.ones(8))
    # truncated, the long row's weight is the bound on every token instead of each token's own 1.2
    truncated, _ = importance_weights(trainer, sampler, mask, SamplingCorrection("sequence_truncate", 2.0))
    torch.testing.assert_close(truncated[0], torch.full((8,), 2.0))


def test_clip_min_masks_below_and_truncates_below():
    trainer, sampler, mask = _case()
    no_min, _ = importance_weights(trainer, sampler, mask, SamplingCorrection("token_mask", 2.0))
    with_min, _ = importance_weights(trainer, sampler, mask, SamplingCorrection("token_mask", 2.0, 0.6))
    assert no_min[0].tolist() == pytest.approx([1.5, 0.0, 0.5])  # control: without clip_min 0.5 stays
    assert with_min[0].tolist() == pytest.approx([1.5, 0.0, 0.0])
    # truncating: without clip_min 0.5 stays 0.5 (vroll's behaviour before the modes), with it it is raised to 0.6
    before, _ = importance_weights(trainer, sampler, mask, SamplingCorrection("token_truncate", 2.0))
    assert before[0].tolist() == pytest.approx([1.5, 2.0, 0.5])
    # mask-only-below: clip_max None (TRL's spelling) or inf (the command line's) is no upper bound
    for high in (None, math.inf):
        only_min, _ = importance_weights(trainer, sampler, mask, SamplingCorrection("token_mask", high, 0.6))
        assert only_min[0].tolist() == pytest.approx([1.5, 3.0, 0.0])


def test_the_mode_functions_are_the_flag_choices_and_take_log_ratios():
    assert tuple(MODES) == IMPORTANCE_SAMPLING_MODES  # the one option set: the flag's choices, the functions
    log_ratio = torch.log(torch.tensor([[1.5, 3.0, 0.5]]))
    assert MODES["token_truncate"](log_ratio, 0.0, 2.0)[0].tolist() == pytest.approx([1.5, 2.0, 0.5])
    assert MODES["sequence_truncate"](log_ratio, 0.0, 3.0)[0].tolist() == pytest.approx([2.25] * 3)


def test_a_long_sequence_ratio_that_overflows_is_masked_or_truncated_not_nan():
    trainer = torch.full((1, 4000), 0.05)  # sum 200: e^200 is inf in fp32
    for mode, expected in (("sequence_mask", 0.0), ("sequence_truncate", 2.0)):
        weights, metrics = importance_weights(trainer, torch.zeros(1, 4000), torch.ones(1, 4000),
                                              SamplingCorrection(mode, 2.0))
        assert (weights == expected).all()
        assert math.isfinite(metrics["is_ratio_max"]) and metrics["is_clipped_frac"] == 1.0


def test_masked_sequences_have_no_policy_gradient():
    trainer, sampler, mask = _case()
    weights, _ = importance_weights(trainer, sampler, mask, SamplingCorrection("sequence_mask", 2.0, 0.6))
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    loss = policy_loss(logps, logps.detach(), torch.tensor([1.0, -1.0]), mask, PolicyLossConfig(),
                       is_weights=weights).loss
    (grad,) = torch.autograd.grad(loss, logps)
    assert (grad[0] == 0).all() and (grad[1, :2] != 0).all()  # row 0's ratio 2.25 lies above clip_max


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(mode="tokens_mask"), "unknown vllm_importance_sampling_mode 'tokens_mask'"),
    (dict(clip_max=0.9), "vllm_importance_sampling_clip_min \\(None\\) must be <= 1 <= "
                         "vllm_importance_sampling_clip_max \\(0.9\\)"),
    (dict(clip_min=1.5, clip_max=3.0), "must be <= 1 <="),
    (dict(clip_min=1.0, clip_max=1.0), "vllm_importance_sampling_clip_min \\(1.0\\) must be below"),
    (dict(mode="sequence_truncate", clip_max=None), "needs a bound to truncate at"),
])
def test_bad_settings_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingCorrection(**kwargs)
    SamplingCorrection(mode="sequence_mask", clip_max=None, clip_min=0.5)  # masking needs no upper bound


# ---------------------------------------------------------------- mismatch metrics


def test_mismatch_k3_kl_and_masked_shares_by_hand():
    trainer, sampler, mask = _case()
    weights, _ = importance_weights(trainer, sampler, mask, SamplingCorrection("sequence_mask", 2.0, 0.6))
    tallies = mismatch_tallies(trainer, sampler, mask, weights)
    k3 = [_k3(r) for r in (1.5, 3.0, 0.5, 0.8, 1.25)]
    assert tallies["mismatch_k3_kl"].total == pytest.approx(sum(k3)) and tallies["mismatch_k3_kl"].count == 5
    assert tallies["masked_token_frac"] == (3.0, 5.0)  # row 0's three tokens
    assert tallies["masked_seq_frac"] == (1.0, 2.0)
    assert tallies["mismatch_k3_kl/len_lt512"] == pytest.approx((sum(k3), 5.0))
    assert tallies["mismatch_k3_kl/len_ge8k"] == (0.0, 0.0)
    # control: token masking drops two tokens and no whole sequence
    weights, _ = importance_weights(trainer, sampler, mask, SamplingCorrection("token_mask", 2.0, 0.6))
    tallies = mismatch_tallies(trainer, sampler, mask, weights)
    assert (tallies["masked_token_frac"], tallies["masked_seq_frac"]) == ((2.0, 5.0), (0.0, 2.0))


def test_k3_is_exact_at_the_tiny_mismatch_of_real_runs():
    """Per-token mismatch is 1e-4 to 1e-2 in bf16 runs: e^x - 1 - x in fp32 cancels to noise at the low end."""
    x = 1e-4
    naive = (torch.exp(torch.tensor(x)) - 1 - x).item()  # the control: fp32's e^x - 1 - x
    assert abs(naive - (math.expm1(x) - x)) > 0.5 * (math.expm1(x) - x)
    tallies = mismatch_tallies(torch.full((1, 4), x), torch.zeros(1, 4), torch.ones(1, 4), torch.ones(1, 4))
    assert tallies["mismatch_k3_kl"].total / 4 == pytest.approx(math.expm1(x) - x, rel=1e-3)


def test_length_buckets_split_by_completion_length_and_pool_exactly():
    """A 600-token row with log-ratio 0.01 per token and a 3-token row with -0.2: each bucket gets its own
    rows' tokens; the step's mean pools tokens over micro-batches (control: the mean of micro-batch means)."""
    assert length_bucket_names() == ["lt512", "512_2k", "2k_8k", "ge8k"]
    trainer, mask = torch.zeros(2, 600), torch.zeros(2, 600)
    trainer[0], mask[0], trainer[1, :3], mask[1, :3] = 0.01, 1.0, -0.2, 1.0
    tallies = mismatch_tallies(trainer, torch.zeros(2, 600), mask, torch.ones(2, 600))
    assert tallies["mismatch_k3_kl/len_512_2k"] == pytest.approx((600 * _k3(math.exp(0.01)), 600))
    assert tallies["mismatch_k3_kl/len_lt512"] == pytest.approx((3 * _k3(math.exp(-0.2)), 3))
    assert tallies["mismatch_k3_kl/len_2k_8k"] == (0.0, 0.0)
    # two micro-batches, one per row: pooled, the overall mean is over all 603 tokens
    one = mismatch_tallies(trainer[:1], torch.zeros(1, 600), mask[:1], torch.ones(1, 600))
    two = mismatch_tallies(trainer[1:], torch.zeros(1, 600), mask[1:], torch.ones(1, 600))
    step = pooled_means(combine([pooled("is/", one), pooled("is/", two)]))
    whole = (600 * _k3(math.exp(0.01)) + 3 * _k3(math.exp(-0.2))) / 603
    assert step["is/mismatch_k3_kl"] == pytest.approx(whole)
    means = (_k3(math.exp(0.01)) + _k3(math.exp(-0.2))) / 2
    assert abs(step["is/mismatch_k3_kl"] - means) > 1e-3  # the control: not the mean of the two means
    assert "is/mismatch_k3_kl/len_2k_8k" not in step and not any(k.endswith((":sum", ":count")) for k in step)
    assert step["is/mismatch_k3_kl/len_512_2k"] == pytest.approx(_k3(math.exp(0.01)))
