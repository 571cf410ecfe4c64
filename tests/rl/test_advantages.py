import math
import warnings

import pytest
import torch

from vroll.rl.advantages import combine_rewards, group_advantages, leave_one_out_advantages


def test_group_scale_hand_computed():
    # Group 1: [1, 0] -> mean 0.5, sample std sqrt(0.5); group 2 is constant -> 0.
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), num_generations=2)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, 0.0, 0.0]))


def test_group_scale_three_generations():
    # [0, 1, 2]: mean 1, sample std 1.
    adv = group_advantages(torch.tensor([0.0, 1.0, 2.0]), num_generations=3, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_group_of_equal_rewards_has_exactly_zero_advantage(scale):
    """Seven 0.1s (the guide's num_generations=7) do not average to 0.1 in float32: the centred
    rewards are ~7e-9, ~7e-5 once divided by std + eps, and such rows would be trained on noise."""
    rewards = torch.tensor([0.1] * 7 + [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    grouped = rewards.view(-1, 7)
    assert (grouped[0] - grouped[0].mean()).abs().max() > 0  # control: the plain formula is not 0
    adv = group_advantages(rewards, 7, scale=scale)
    assert torch.equal(adv[:7], torch.zeros(7)) and bool((adv[7:] != 0).all())
    loo = leave_one_out_advantages(torch.tensor([0.7] * 3 + [1.0, 0.0, 0.0]), 3)
    assert torch.equal(loo[:3], torch.zeros(3)) and bool((loo[3:] != 0).all())


def test_batch_scale_uses_std_of_all_rewards():
    # Centred by group: [0.5, -0.5, 0, 0]; batch rewards std = sqrt(2.75 / 3).
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, scale="batch")
    s = math.sqrt(2.75 / 3) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.0]))


def test_none_scale_is_dr_grpo_centering_only():
    adv = group_advantages(torch.tensor([1.0, 0.0, 5.0, 3.0]), 2, scale="none")
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 1.0, -1.0]))


def test_single_generation_gives_zero_not_nan():
    adv = group_advantages(torch.tensor([1.0, 3.0]), 1)
    torch.testing.assert_close(adv, torch.zeros(2))


def test_indivisible_length_names_both_numbers():
    with pytest.raises(ValueError, match=r"\(5\).*\(2\)"):
        group_advantages(torch.ones(5), 2)


def test_unknown_scale():
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.ones(4), 2, scale="sum")


def test_combine_rewards_nan_is_not_applicable():
    nan = float("nan")
    per_func = torch.tensor([[1.0, nan], [0.5, 2.0], [nan, nan]])
    with pytest.warns(RuntimeWarning, match="returned None"):
        total = combine_rewards(per_func, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(total, torch.tensor([1.0, 1.5, 0.0]))


def test_combine_rewards_no_warning_without_all_nan_rows():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total = combine_rewards(torch.tensor([[1.0, 2.0]]), torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(total, torch.tensor([0.0]))


def test_combine_rewards_shape_check():
    with pytest.raises(ValueError, match="weights"):
        combine_rewards(torch.ones(3, 2), torch.ones(3))


def test_leave_one_out_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])  # two prompts, k=3
    # prompt 0: 1 - 0, 0 - 0.5, 0 - 0.5; prompt 1: 2 - 3.5, 2 - 3.5, 5 - 2
    expected = torch.tensor([1.0, -0.5, -0.5, -1.5, -1.5, 3.0])
    assert torch.allclose(leave_one_out_advantages(rewards, 3), expected)
    # the closed form (r - mean) * k / (k - 1), and *not* GRPO's std-scaled advantage
    centered = group_advantages(rewards, 3, scale="none") * 3 / 2
    assert torch.allclose(leave_one_out_advantages(rewards, 3), centered)
    assert not torch.allclose(leave_one_out_advantages(rewards, 3), group_advantages(rewards, 3))
    with pytest.raises(ValueError, match="k >= 2"):
        leave_one_out_advantages(rewards, 4)
