"""Built-in verifiable tasks: each is one file of this package, and the one registry is here.

A task module defines ``TASK = Task(...)``: its rows, the strict judge ``vroll eval`` scores with,
the reward functions it adds to the built-in names, the rewards a run on its data gets when it
names none, its training rows for ``--dataset_name <name>``, its environment for
``--environment <name>`` (multi-turn tasks), and how to recognize its layout in other data.
:func:`builtin_tasks` finds every such module, so a new task is one new file:

    # vroll/tasks/guess.py
    TASK = Task("guess", rows=guess_rows, correct=guess_correct, rewards={"guess_correct": guess_correct},
                default_rewards=("guess_correct",), dataset=lambda size, seed: guess_rows("train", size))
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "test")

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Task:
    """A built-in task (see the module docstring)."""

    name: str
    rows: Callable[[str, int], Rows]  # (split, n) -> the first n rows of that split, prompted
    correct: Callable[..., list[float]]  # a reward function: 1.0 for a right answer, else 0.0 (strict)
    rewards: Mapping[str, Callable[..., Any]] = field(default_factory=dict)  # built-in reward names it adds
    default_rewards: tuple[str, ...] = ()  # the rewards of a run on this task's data that names none
    dataset: Callable[[int, int], Rows] | None = None  # (size, seed) -> training rows of --dataset_name <name>
    environment: Callable[[dict[str, Any]], Any] | None = None  # the factory of --environment <name> (multi-turn)
    recognizes: Callable[[dict[str, Any]], bool] | None = None  # a row of other data in this task's layout
    takes_images: bool = False  # rows carry images: a vision-language task (its layout is checked first)
    answer_column: str = "answer"  # the reference answer's column (shown beside each reply)
    max_tokens: int = 24  # the reply (or whole episode) length limit that eval judges under by default


def builtin_tasks() -> dict[str, Task]:
    """Every task module's ``TASK`` by name (a fresh dict each call)."""
    tasks: dict[str, Task] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        task = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TASK", None)
        if isinstance(task, Task):
            tasks[task.name] = task
    return tasks


def get_task(name: str) -> Task:
    """The built-in task ``name``, or a ValueError listing the known ones."""
    tasks = builtin_tasks()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


def task_rewards() -> dict[str, Callable[..., Any]]:
    """The reward functions every task adds, by their built-in names."""
    return {name: func for task in builtin_tasks().values() for name, func in task.rewards.items()}


def builtin_environments() -> dict[str, Callable[[dict[str, Any]], Any]]:
    """The environment factories of the multi-turn tasks, by task name."""
    return {name: task.environment for name, task in builtin_tasks().items() if task.environment is not None}


def task_dataset(name: str, size: int, seed: int) -> Rows | None:
    """The training rows of the task ``name`` (``--dataset_name``), or None where no task is called so."""
    task = builtin_tasks().get(name)
    return None if task is None or task.dataset is None else task.dataset(size, seed)


def load_environment(spec: str) -> Callable[[dict[str, Any]], Any]:
    """The factory an ``--environment`` spec names: a task's (``calculator``) or ``package.module:factory``."""
    from vroll.plugins import import_callable

    builtins = builtin_environments()
    if spec in builtins:
        return builtins[spec]
    if ":" not in spec:
        raise ValueError(f"unknown environment {spec!r}; built-ins: {', '.join(sorted(builtins))}, "
                         "or 'package.module:factory' (a callable taking a dataset row)")
    return import_callable(spec, "environment factory")


def default_reward_funcs(dataset_name: str, rows: Rows) -> list[str]:
    """The reward functions of a run that names none: those of the task its data comes from.

    A task's own dataset (``--dataset_name addition``) gets its rewards; other data gets the rewards
    of the task whose layout its first row has (rows with an ``answer`` column: addition's;
    referring-expression rows, images and a box ``solution``: the IoU and format rewards that
    VLM-R1's ``grpo_rec.py`` hard-codes, so the guide's script runs as written). Anything else must
    name its rewards: guessing would train on the wrong signal.
    """
    tasks = builtin_tasks()
    own = tasks.get(dataset_name)
    if own is not None and own.dataset is not None:
        return list(own.default_rewards)
    first = rows[0] if rows else {}
    for task in sorted(tasks.values(), key=lambda t: (not t.takes_images, t.name)):  # the more specific first
        if task.recognizes is not None and task.recognizes(first):
            return list(task.default_rewards)
    names = ", ".join(name for task in tasks.values() for name in task.rewards)
    raise ValueError(
        f"--reward_funcs is required for dataset {dataset_name!r} (columns: {', '.join(sorted(first)) or 'none'}): "
        f"its rows are in no built-in task's layout; name built-ins ({names}), 'package.module:function' or "
        "'rm:<model>'")
