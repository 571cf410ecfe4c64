"""The sender's NaN/inf check: decided through sums, with the exact check where a sum cannot decide."""

from __future__ import annotations

import pytest
import torch

from vroll.protocol import Bucket, TensorMeta
from vroll.weightsync.buckets import BucketBuffers, dtype_name, pack, plan_buckets
from vroll.weightsync.sender import all_finite, nonfinite_names, packed_nonfinite


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


def _bucket(weights: dict[str, torch.Tensor], wire: torch.dtype) -> tuple[Bucket, torch.Tensor]:
    (bucket,) = plan_buckets([TensorMeta(n, dtype_name(wire), tuple(t.shape)) for n, t in weights.items()], 1 << 30)
    buffers = BucketBuffers(torch.device("cpu"))
    return bucket, pack(bucket, weights, torch.device("cpu"), buffers.get(0, bucket))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_value_in_a_packed_bucket_is_caught_and_named(bad):
    """The push checks each packed bucket with one reduction and names the culprit only then. Control:
    the same bucket without the bad value passes (so the check is not merely refusing everything)."""
    weights = _weights()
    bucket, flat = _bucket(weights, torch.bfloat16)
    assert packed_nonfinite(bucket, flat) == []
    weights["layer2.weight"][7, 3] = bad
    bucket, flat = _bucket(weights, torch.bfloat16)
    assert packed_nonfinite(bucket, flat) == ["layer2.weight"]


def test_the_packed_check_reads_the_wire_dtype_and_cannot_overflow():
    """fp32 weights above 65504 become inf in an fp16 bucket (named); finite fp16 values whose sum
    overflows (the old sum-based check's blind spot, where it fell back to an element-wise pass) pass."""
    bucket, flat = _bucket({"ok": torch.ones(4), "big": torch.tensor([1.0, 7e4])}, torch.float16)
    assert packed_nonfinite(bucket, flat) == ["big"]
    bucket, flat = _bucket({"many": torch.full((1000,), 6e4)}, torch.float16)
    assert not torch.isfinite(flat.sum()) and packed_nonfinite(bucket, flat) == []
