"""Prompt datasets and the order they are visited in.

A dataset is a list of rows (dicts). A row's prompt is its ``prompt`` column (a text,
or a list of chat messages) or, failing that, its ``messages`` column (the
conversation up to its last user turn). Every other column is passed to reward
functions by name (the addition task's ``answer``, for instance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vroll.tasks.addition import addition_splits

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(name: str, config: str | None, split: str, size: int, seed: int) -> list[dict[str, Any]]:
    """Rows of the built-in task, a local file, or a Hugging Face dataset."""
    if name == "addition":
        return addition_splits(seed, size, 0)[0]
    import datasets

    path = Path(name)
    if path.suffix in _LOCAL_FORMATS:
        if not path.exists():
            raise ValueError(f"dataset file {name} does not exist")
        ds = datasets.load_dataset(_LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(name, config, split=split)
    return [dict(row) for row in ds]


def prompt_of(row: dict[str, Any]) -> str | list[dict[str, str]]:
    """The prompt of one row: ``prompt``, or ``messages`` up to the last user turn."""
    if "prompt" in row:
        return row["prompt"]
    messages = row["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last_user + 1]


def check_prompt_column(rows: list[dict[str, Any]], name: str) -> None:
    """Fail early, naming the columns, when there is nothing to prompt with."""
    if not rows:
        raise ValueError(f"dataset {name!r} has no rows")
    cols = sorted(rows[0])
    if "prompt" not in rows[0] and "messages" not in rows[0]:
        raise ValueError(f"dataset {name!r} has no 'prompt' or 'messages' column; its columns are {cols}")
    if "messages" in rows[0] and "prompt" not in rows[0]:
        if not any(m.get("role") == "user" for m in rows[0]["messages"]):
            raise ValueError(f"dataset {name!r}: 'messages' has no user turn to prompt with")


@dataclass
class PromptSampler:
    """Seeded epochs over the rows; its position is part of a checkpoint."""

    num_rows: int
    seed: int
    epoch: int = 0
    index: int = 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        """The next ``n`` row indices, moving into the next epoch when needed."""
        out: list[int] = []
        order = self._order()
        while len(out) < n:
            if self.index == self.num_rows:
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            take = min(n - len(out), self.num_rows - self.index)
            out += order[self.index : self.index + take]
            self.index += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
