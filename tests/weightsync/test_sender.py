"""The sender's NaN/inf check: decided through sums, with the exact check where a sum cannot decide."""

from __future__ import annotations

import pytest
import torch

from vroll.weightsync.sender import all_finite, nonfinite_names


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(64, 32, generator=gen).to(torch.bfloat16) for i in range(4)}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_single_bad_value_is_found_and_named(bad):
    weights = _weights()
    weights["layer2.weight"][7, 3] = bad
    assert nonfinite_names(weights) == ["layer2.weight"]
    assert not all_finite(torch.cat([t.view(-1) for t in weights.values()]))


def test_opposite_infinities_do_not_cancel():
    weights = _weights()
    weights["layer0.weight"][0, 0], weights["layer3.weight"][0, 0] = float("inf"), float("-inf")
    assert nonfinite_names(weights) == ["layer0.weight", "layer3.weight"]


def test_finite_values_whose_sum_overflows_are_finite():
    """The sum of finite values can overflow; that alone must not refuse a sync (the exact check
    decides). The control: the same values as one inf are refused."""
    huge = {"w": torch.full((8,), 3e38, dtype=torch.float32)}
    assert not torch.isfinite(huge["w"].sum())  # the case the fallback exists for
    assert nonfinite_names(huge) == [] and all_finite(huge["w"])
    huge["w"][0] = float("inf")
    assert nonfinite_names(huge) == ["w"] and not all_finite(huge["w"])


def test_values_that_overflow_the_wire_dtype_are_named():
    """fp32 weights sent as fp16 become inf above 65504: checked in the wire dtype."""
    weights = {"ok": torch.ones(4), "big": torch.tensor([1.0, 7e4])}
    assert nonfinite_names(weights) == []
    assert nonfinite_names(weights, torch.float16) == ["big"]


def test_nothing_to_check_is_finite():
    assert nonfinite_names({}) == []
    assert nonfinite_names({"empty": torch.empty(0)}) == []
