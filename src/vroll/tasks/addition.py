"""Two-digit addition: a tiny verifiable task that a ~135M instruct model can partly solve."""

from __future__ import annotations

import random
import re
from typing import Any

LOW, HIGH = 10, 99  # inclusive operand range
_NUM_PAIRS = (HIGH - LOW + 1) ** 2
_INT_RE = re.compile(r"-?\d+")
_JUST_NUMBER_RE = re.compile(r"^-?\d+\.?$")
FORMAT_WINDOW = 20  # characters in which a number earns the partial format reward


def _shuffled_pairs(seed: int) -> list[tuple[int, int]]:
    """All (a, b) operand pairs in a seed-determined order.

    Shuffling the full population (8100 pairs) makes every prefix deterministic, so sizes can
    change without reshuffling what was already drawn and splits are disjoint by construction.
    """
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(seed).shuffle(pairs)
    return pairs


def _row(a: int, b: int) -> dict[str, Any]:
    """One conversational dataset row for ``a + b``."""
    content = f"What is {a} + {b}? Answer with just the number."
    return {"prompt": [{"role": "user", "content": content}], "answer": str(a + b)}


def make_addition_dataset(num_examples: int, seed: int) -> list[dict[str, Any]]:
    """Deterministic list of distinct addition problems.

    Each row is ``{"prompt": [{"role": "user", "content": "What is 37 + 48? ..."}],
    "answer": "85"}`` with operands in 10..99.
    """
    if not 0 <= num_examples <= _NUM_PAIRS:
        raise ValueError(f"num_examples must be in [0, {_NUM_PAIRS}], got {num_examples}")
    return [_row(a, b) for a, b in _shuffled_pairs(seed)[:num_examples]]


def addition_splits(
    seed: int, train_size: int, test_size: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Disjoint (train, test) splits: no (a, b) pair occurs in both."""
    if train_size < 0 or test_size < 0 or train_size + test_size > _NUM_PAIRS:
        raise ValueError(
            f"train_size + test_size must be in [0, {_NUM_PAIRS}], got {train_size} + {test_size}"
        )
    rows = make_addition_dataset(train_size + test_size, seed)
    return rows[:train_size], rows[train_size:]


def extract_answer(text: str) -> int | None:
    """The last integer on the first non-empty line (``"37 + 48 = 85"`` -> 85), or None.

    A small model answers "a + b = c" or "The sum of a and b is c" as often as a bare
    "c": the result ends the sentence. Later lines are ignored so that rambling on
    after a wrong answer does not find a right number by chance.
    """
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    found = _INT_RE.findall(lines[0]) if lines else []
    return int(found[-1]) if found else None


def addition_correct(
    prompts: list[Any], completions: list[str], answer: list[str], **kwargs: Any
) -> list[float]:
    """1.0 if the completion's answer (see :func:`extract_answer`) is right, else 0.0."""
    rewards = []
    for completion, target in zip(completions, answer, strict=True):
        value = extract_answer(completion)
        rewards.append(1.0 if value is not None and value == int(target) else 0.0)
    return rewards


def addition_format(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    """Reward answering with a bare number.

    1.0 if the stripped completion is just an integer (optionally followed by "."), 0.5 if an
    integer appears within its first 20 characters, else 0.0.
    """
    rewards = []
    for completion in completions:
        text = completion.strip()
        if _JUST_NUMBER_RE.match(text):
            rewards.append(1.0)
        elif _INT_RE.search(text[:FORMAT_WINDOW]):
            rewards.append(0.5)
        else:
            rewards.append(0.0)
    return rewards
