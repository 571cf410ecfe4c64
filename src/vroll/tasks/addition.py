"""Two-digit addition: a tiny verifiable task that a ~135M instruct model can partly solve."""

from __future__ import annotations

import random
import re
from typing import Any

from vroll.rows import completion_text
from vroll.tasks import Task

LOW, HIGH = 10, 99  # inclusive operand range
_NUM_PAIRS = (HIGH - LOW + 1) ** 2
_INT_RE = re.compile(r"-?\d+")
_JUST_NUMBER_RE = re.compile(r"^-?\d+\.?$")
_EQUATION_RE = re.compile(r"^(?:(?P<a>-?\d+)\s*\+\s*(?P<b>-?\d+)\s*=\s*)?(?P<n>-?\d+)\.?$")
_SENTENCE_RE = re.compile(r"^[A-Za-z][^=\n]*?(?<![\d.])(?<!\d )(?P<n>-?\d+)\.?$")
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


TRAIN_SIZE = 2000  # the standard split: the first 2000 shuffled pairs train, the rest is held out
SPLIT_SEED = 0


def addition_rows(split: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of the standard ``"train"`` or ``"test"`` split (disjoint, seed 0).

    The same rows as ``addition_splits(SPLIT_SEED, TRAIN_SIZE, n)`` gives, so the demo's
    held-out problems and ``vroll eval --split test`` are the same problems.
    """
    limits = {"train": TRAIN_SIZE, "test": _NUM_PAIRS - TRAIN_SIZE}
    if split not in limits:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= n <= limits[split]:
        raise ValueError(f"n must be in [1, {limits[split]}] for the {split} split, got {n}")
    train, test = addition_splits(SPLIT_SEED, TRAIN_SIZE, n if split == "test" else 0)
    return train[:n] if split == "train" else test


def extract_answer(text: str) -> int | None:
    """The reply's final answer if the WHOLE reply is one accepted answer line, else None.

    Accepted (after stripping surrounding whitespace; one line, nothing before or after):

    - ``N`` or ``N.``                                  e.g. ``"85"``
    - ``A + B = N`` or ``A + B = N.``, with A + B == N  e.g. ``"37 + 48 = 85"``
    - a sentence without ``=`` that starts with a letter and ends with ``N`` or ``N.`` (not
      right after another number: ``"is 84 85"`` is no answer),
      e.g. ``"The sum of 37 and 48 is 85."``

    Anything else is None: a second line (``"37 + 48 = 85\n46 + 27 = 63"``), text after the
    number (``"85 is the answer"``), an equation that is false or chained. A reply that only
    starts with the right answer is not an answer: a reader takes its last words.
    """
    line = text.strip()
    if "\n" in line:
        return None
    match = _EQUATION_RE.match(line) or _SENTENCE_RE.match(line)
    if match is None:
        return None
    value = int(match["n"])
    if match.re is _EQUATION_RE and match["a"] is not None and int(match["a"]) + int(match["b"]) != value:
        return None
    return value


def addition_correct(
    prompts: list[Any], completions: list[Any], answer: list[str], truncated: list[bool] | None = None,
    **kwargs: Any,
) -> list[float]:
    """1.0 if the whole completion (a text, or TRL's message form) is a right answer (see
    :func:`extract_answer`), else 0.0.

    ``truncated`` (passed by the trainer: cut at ``max_completion_length``, no EOS) scores 0:
    a reply that had not ended is not an answer, whatever its first tokens say.
    """
    cut = truncated if truncated is not None else [False] * len(completions)
    rewards = []
    for completion, target, was_cut in zip(map(completion_text, completions), answer, cut, strict=True):
        value = None if was_cut else extract_answer(completion)
        rewards.append(1.0 if value is not None and value == int(target) else 0.0)
    return rewards


def addition_format(
    prompts: list[Any], completions: list[Any], truncated: list[bool] | None = None, **kwargs: Any
) -> list[float]:
    """Reward answering with a bare number.

    1.0 if the stripped completion is just an integer (optionally followed by "."), 0.5 if an
    integer appears within its first 20 characters, else 0.0; 0.0 if it was ``truncated``.
    """
    cut = truncated if truncated is not None else [False] * len(completions)
    rewards = []
    for completion, was_cut in zip(completions, cut, strict=True):
        text = completion_text(completion).strip()
        if was_cut:
            rewards.append(0.0)
        elif _JUST_NUMBER_RE.match(text):
            rewards.append(1.0)
        elif _INT_RE.search(text[:FORMAT_WINDOW]):
            rewards.append(0.5)
        else:
            rewards.append(0.0)
    return rewards


def _addition_dataset(size: int, seed: int) -> list[dict[str, Any]]:
    """``--dataset_name addition``: the first ``size`` problems of the pairs shuffled with ``seed``."""
    return addition_splits(seed, size, 0)[0]


TASK = Task("addition", rows=addition_rows, correct=addition_correct,
            rewards={"addition_correct": addition_correct, "addition_format": addition_format},
            default_rewards=("addition_correct", "addition_format"), dataset=_addition_dataset,
            recognizes=lambda row: "answer" in row)  # a user's file in this layout gets these rewards too
