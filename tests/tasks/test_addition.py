import re

import pytest

from vroll.rewards import builtin_reward_funcs
from vroll.tasks.addition import (
    addition_correct,
    addition_format,
    addition_splits,
    extract_answer,
    make_addition_dataset,
)

PROMPT_RE = re.compile(r"What is (\d+) \+ (\d+)\?")


def _operands(row):
    a, b = PROMPT_RE.search(row["prompt"][0]["content"]).groups()
    return int(a), int(b)


def test_rows_are_conversational_and_correct():
    rows = make_addition_dataset(50, seed=1)
    assert len(rows) == 50
    for row in rows:
        assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
        a, b = _operands(row)
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert row["answer"] == str(a + b)


def test_dataset_is_deterministic_per_seed():
    assert make_addition_dataset(20, seed=3) == make_addition_dataset(20, seed=3)
    assert make_addition_dataset(20, seed=3) != make_addition_dataset(20, seed=4)
    # Growing the dataset keeps the already drawn rows.
    assert make_addition_dataset(30, seed=3)[:20] == make_addition_dataset(20, seed=3)


def test_no_duplicate_problems():
    rows = make_addition_dataset(2000, seed=0)
    assert len({_operands(r) for r in rows}) == 2000


def test_splits_are_disjoint_and_sized():
    train, test = addition_splits(seed=0, train_size=3000, test_size=500)
    assert (len(train), len(test)) == (3000, 500)
    assert not {_operands(r) for r in train} & {_operands(r) for r in test}
    assert addition_splits(0, 3000, 500) == (train, test)


def test_too_many_examples():
    with pytest.raises(ValueError, match="8100"):
        make_addition_dataset(8101, seed=0)
    with pytest.raises(ValueError, match="8100"):
        addition_splits(0, 8000, 200)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("85", 85), (" The answer is 85.", 85), ("-3", -3), ("37 + 48 = 85", 85), ("none", None),
     ("\n\n84\nor 85", 84), ("", None)],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_addition_correct():
    completions = ["85", "The answer is 85.", "84", "37 + 48 = 85", "no idea", "84\n85"]
    rewards = addition_correct([None] * 6, completions, answer=["85"] * 6)
    assert rewards == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def test_addition_format():
    completions = ["85", " 85.\n", "The answer is 85.", "x" * 25 + " 85", "no idea"]
    assert addition_format([None] * 5, completions) == [1.0, 1.0, 0.5, 0.0, 0.0]


def test_registered_as_builtins():
    funcs = builtin_reward_funcs()
    assert funcs["addition_correct"] is addition_correct
    assert funcs["addition_format"] is addition_format
