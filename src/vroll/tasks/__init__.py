"""Built-in verifiable tasks (datasets + reward functions) for demos, tests and ``vroll eval``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Task:
    """A built-in task: its rows for a split, and the strict 0/1 judge of a whole reply."""

    name: str
    rows: Callable[[str, int], list[dict[str, Any]]]  # (split, n) -> the first n rows of that split
    correct: Callable[..., list[float]]  # a reward function: 1.0 for a right answer, else 0.0
    answer_column: str = "answer"  # the reference answer's column (shown beside each reply)
    environment: str | None = None  # an --environment the task's episodes run in (multi-turn), else one reply
    max_tokens: int = 24  # the reply (or whole episode) length limit that eval judges under by default


def builtin_tasks() -> dict[str, Task]:
    """Built-in tasks by name (a fresh dict each call)."""
    from vroll.tasks.addition import addition_correct, addition_rows
    from vroll.tasks.calculator import MAX_TOKENS, calculator_correct, calculator_split_rows
    from vroll.tasks.rec import rec_correct, rec_rows

    return {"addition": Task("addition", addition_rows, addition_correct),
            "rec": Task("rec", rec_rows, rec_correct, answer_column="solution"),
            "calculator": Task("calculator", calculator_split_rows, calculator_correct, environment="calculator",
                               max_tokens=MAX_TOKENS)}


def get_task(name: str) -> Task:
    """The built-in task ``name``, or a ValueError listing the known ones."""
    tasks = builtin_tasks()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


def default_reward_funcs(dataset_name: str, rows: list[dict[str, Any]]) -> list[str]:
    """The reward functions of a run that names none: the task its data comes from.

    The built-in addition task (or rows with an ``answer`` column, its layout) gets the addition
    rewards; referring-expression rows (images and a box ``solution``, VLM-R1's layout) get the
    IoU and format rewards that VLM-R1's ``grpo_rec.py`` hard-codes, so the guide's script runs
    as written. Anything else must name its rewards: guessing would train on the wrong signal.
    """
    from vroll.tasks.rec import solution_box

    if dataset_name == "addition":
        return ["addition_correct", "addition_format"]
    first = rows[0] if rows else {}
    if "solution" in first and any(k in first for k in ("image", "images")):
        try:
            solution_box(first["solution"])
            return ["rec_iou", "rec_format"]
        except ValueError:
            pass
    if "answer" in first:
        return ["addition_correct", "addition_format"]
    raise ValueError(
        f"--reward_funcs is required for dataset {dataset_name!r} (columns: {', '.join(sorted(first)) or 'none'}): "
        "it is neither the addition task nor referring-expression data; name built-ins (addition_correct, "
        "addition_format, rec_iou, rec_format), 'package.module:function' or 'rm:<model>'")
