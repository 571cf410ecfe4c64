"""The batch arithmetic (``vroll.batching``): a request's work, and splitting a batch to fit a budget."""

from __future__ import annotations

import random

import pytest

from vroll.batching import request_work, split_by_budget


def test_request_work_counts_every_sequence_at_its_longest():
    assert request_work([10, 20], n=4, max_tokens=100) == 4 * (10 + 100 + 20 + 100)
    assert request_work([], n=8, max_tokens=100) == 0


@pytest.mark.parametrize("seed", range(5))
def test_split_by_budget_covers_every_prompt_in_order_within_the_caps(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 200))]
    n, max_tokens, budget, items = rng.randint(1, 8), rng.randint(1, 64), rng.randint(2_000, 20_000), rng.randint(1, 40)
    ranges = split_by_budget(lengths, n, max_tokens, budget, items)
    assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]] and ranges[-1][1] == len(lengths)
    for a, b in ranges:
        assert 0 < b - a <= items
        assert request_work(lengths[a:b], n, max_tokens) <= budget or b - a == 1  # alone over: its own range
    # greedy: a range stops only where the next prompt would break a cap
    for (a, b), _ in zip(ranges, ranges[1:], strict=False):
        assert b - a == items or request_work(lengths[a : b + 1], n, max_tokens) > budget


def test_split_by_budget_without_caps_is_one_range_and_a_big_prompt_stands_alone():
    assert split_by_budget([5] * 10, 2, 8, 0, 0) == [(0, 10)]
    assert split_by_budget([5, 1000, 5], 1, 10, 100, 0) == [(0, 1), (1, 2), (2, 3)]
    assert split_by_budget([], 1, 10, 100, 4) == []
