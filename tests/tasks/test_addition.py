import re

import pytest

from vroll.rewards import builtin_reward_funcs
from vroll.tasks import get_task
from vroll.tasks.addition import (
    addition_correct,
    addition_format,
    addition_rows,
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
    [("85", 85), ("85.", 85), (" 85\n", 85), ("-3", -3), ("37 + 48 = 85", 85), ("37+48=85.", 85),
     ("The answer is 85.", 85), ("The sum of 37 and 48 is 85", 85),
     # nothing may follow the answer, and the whole reply must be one answer line
     ("85 is the answer", None), ("85\n", 85), ("84\n85", None), ("\n\n84\nor 85", None),
     ("37 + 48 = 85\n37 + 48 = 85", None), ("The answer is 84 85", None), ("The answer is 8.5", None),
     # a false or chained equation is no answer, even when it ends in the right number
     ("37 + 48 = 84", None), ("37 + 47 = 85", None), ("x = 85", None), ("1 + 2 = 3 = 85", None),
     ("none", None), ("", None)],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# The replies of a 150-step H100 run without truncation handling (issue 14): a right first line,
# then text until the length cap. A reader takes the last words: both are wrong answers.
REWARD_HACKS = [("14 + 27 = 31\n46 + 27 = 63\n14", "41"), ("51 + 89 = 140\n626 = 51 * 19 +", "140"),
                ("14 + 27 = 41\n46 + 27 = 73\n14", "41")]


@pytest.mark.parametrize(("completion", "target"), REWARD_HACKS)
def test_reward_hacking_replies_score_zero(completion, target):
    assert addition_correct([None], [completion], answer=[target]) == [0.0]
    # control: the same first line alone, ended, is right
    first = completion.splitlines()[0]
    if int(first.split("=")[-1]) == int(target):
        assert addition_correct([None], [first], answer=[target]) == [1.0]


def test_addition_correct():
    completions = ["85", "The answer is 85.", "84", "37 + 48 = 85", "no idea", "84\n85", "85\nOK"]
    rewards = addition_correct([None] * 7, completions, answer=["85"] * 7)
    assert rewards == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_truncated_reply_scores_zero():
    # A reply cut at the length limit had not ended: even a right text is no answer.
    completions = ["37 + 48 = 85", "37 + 48 = 85", "85"]
    assert addition_correct([None] * 3, completions, answer=["85"] * 3, truncated=[True, False, True]) \
        == [0.0, 1.0, 0.0]
    # a wrong answer list scores 0 however the replies end (negative control)
    assert addition_correct([None] * 3, completions, answer=["86"] * 3, truncated=[False] * 3) == [0.0] * 3


def test_rows_match_the_demo_splits():
    train, test = addition_splits(seed=0, train_size=2000, test_size=200)
    assert addition_rows("test", 200) == test
    assert addition_rows("train", 2000) == train
    assert addition_rows("test", 8) == test[:8]
    with pytest.raises(ValueError, match="split"):
        addition_rows("valid", 8)
    with pytest.raises(ValueError, match="n must be"):
        addition_rows("train", 2001)


def test_task_registry():
    task = get_task("addition")
    assert task.correct is addition_correct and task.rows("test", 3) == addition_rows("test", 3)
    with pytest.raises(ValueError, match="built-in tasks: addition"):
        get_task("gsm8k")


def test_addition_format():
    completions = ["85", " 85.\n", "The answer is 85.", "x" * 25 + " 85", "no idea"]
    assert addition_format([None] * 5, completions) == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert addition_format([None] * 2, ["85", "85 and"], truncated=[False, True]) == [1.0, 0.0]


def test_registered_as_builtins():
    funcs = builtin_reward_funcs()
    assert funcs["addition_correct"] is addition_correct
    assert funcs["addition_format"] is addition_format
