"""Prompt datasets and the order they are visited in.

A dataset is a list of rows (dicts); what a row's prompt and images are is ``vroll.rows``'s.
Image paths, relative ones resolved against ``image_root``, are checked before training starts.

``dataset_name`` may also be a YAML file in VLM-R1's format (``datasets: [{json_path: ...,
sampling_strategy: "first:1000"}]``) or a ``;``-separated list of JSON/JSONL files: their
rows (``image``, ``problem``, ``solution``) are prompted with the REC task's question template,
as VLM-R1's ``grpo_rec.py`` does.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vroll.rows import IMAGE_COLUMNS, image_values, prompt_of
from vroll.tasks import task_dataset

if TYPE_CHECKING:
    from vroll.trainer.config import TrainConfig

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_YAML = (".yaml", ".yml")


def train_rows(args: TrainConfig, train_dataset: Any = None) -> list[dict[str, Any]]:
    """The run's prompt rows: ``train_dataset`` if given, else ``--dataset_name``'s; checked before any step."""
    if train_dataset is None:
        rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split, args.dataset_size,
                         args.data_seed or 0)
    else:
        rows = [dict(r) for r in train_dataset]
    return prepare_rows(rows, args.dataset_name if train_dataset is None else "train_dataset", args.image_root)


def load_rows(name: str, config: str | None, split: str, size: int, seed: int) -> list[dict[str, Any]]:
    """Rows of the built-in task, a local file, a YAML/``;`` list of JSON files, or a Hugging Face dataset."""
    rows = task_dataset(name, size, seed)  # a built-in task's own rows (addition, calculator)
    if rows is not None:
        return rows
    if name.endswith(_YAML) or ";" in name:
        return load_json_list(name, seed)
    import datasets

    path = Path(name)
    if path.suffix in _LOCAL_FORMATS:
        if not path.exists():
            raise ValueError(f"dataset file {name} does not exist")
        ds = datasets.load_dataset(_LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(name, config, split=split)
    return [dict(row) for row in ds]


# ---------------------------------------------------------------------------- VLM-R1's lists


def load_json_list(name: str, seed: int) -> list[dict[str, Any]]:
    """Rows of every JSON/JSONL file a YAML file (VLM-R1's format) or a ``;``-separated list names.

    A YAML entry's ``json_path`` is relative to the YAML file's folder (or to the working
    directory); ``sampling_strategy`` is ``all``, ``first:N``, ``end:N`` or ``random:N`` (N may
    be a percentage, ``random:10%``). Rows without a prompt get the REC question template.
    """
    from vroll.tasks.rec import rec_prompt

    if name.endswith(_YAML):
        entries = _yaml_entries(Path(name))
    else:
        entries = [{"json_path": p.strip()} for p in name.split(";") if p.strip()]
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for entry in entries:
        part = _read_json_rows(Path(entry["json_path"]))
        rows += _sample(part, str(entry.get("sampling_strategy", "all")), rng, entry["json_path"])
    for row in rows:
        if "prompt" not in row and "messages" not in row and "problem" in row:
            row["prompt"] = rec_prompt(row["problem"], len(image_values(row)))
    return rows


def _yaml_entries(path: Path) -> list[dict[str, Any]]:
    import yaml

    if not path.exists():
        raise ValueError(f"dataset file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("json_path") for e in entries):
        raise ValueError(f"{path}: expected 'datasets:' with a list of entries that each have a json_path "
                         f"(VLM-R1's format)")
    out = []
    for e in entries:
        p = Path(e["json_path"])
        if not p.is_absolute() and (path.parent / p).exists():
            p = path.parent / p
        out.append({**e, "json_path": str(p)})
    return out


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: only .json and .jsonl files can be listed (VLM-R1's format)")
    if not path.exists():
        raise ValueError(f"dataset file {path} does not exist")
    text = path.read_text()
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of objects (rows)")
    return rows


def _sample(rows: list[dict[str, Any]], strategy: str, rng: random.Random, where: str) -> list[dict[str, Any]]:
    kind, _, number = strategy.partition(":")
    if kind == "all" and not number:
        return rows
    if kind not in ("first", "end", "random") or not number.rstrip("%").isdigit():
        raise ValueError(f"{where}: sampling_strategy must be all, first:N, end:N or random:N (N or N%), "
                         f"got {strategy!r}")
    n = math.ceil(int(number[:-1]) * len(rows) / 100) if number.endswith("%") else int(number)
    if kind == "first":
        return rows[:n]
    if kind == "end":
        return rows[-n:] if n else []
    return rng.sample(rows, min(n, len(rows)))


def _resolve_paths(row: dict[str, Any], index: int, image_root: str | None) -> None:
    """Relative image paths made absolute (against ``image_root``); a missing file is an error."""
    for col in IMAGE_COLUMNS:
        value = row.get(col)
        if value is None:
            continue
        values = list(value) if isinstance(value, list | tuple) else [value]
        for i, v in enumerate(values):
            path = v.get("path") if isinstance(v, dict) and not v.get("bytes") else v
            if not isinstance(path, str | Path):
                continue
            p = Path(path).expanduser()
            if not p.is_absolute() and image_root:
                p = Path(image_root).expanduser() / p
            if not p.is_file():
                root = f" (image_root: {image_root})" if image_root else " (no --image_root given)"
                raise ValueError(f"row {index}: image file {p} does not exist{root}")
            values[i] = str(p.resolve())
        row[col] = values if isinstance(value, list | tuple) else values[0]


def prepare_rows(rows: list[dict[str, Any]], name: str, image_root: str | None = None) -> list[dict[str, Any]]:
    """Check that every row can be prompted and that every image file exists, before any step.

    Relative image paths are resolved against ``image_root`` (in place).
    """
    check_prompt_column(rows, name)
    for i, row in enumerate(rows):
        _resolve_paths(row, i, image_root)
        n = len(image_values(row))
        if n:
            try:
                prompt_of(row)
            except ValueError as exc:
                raise ValueError(f"dataset {name!r} row {i}: {exc}") from None
    return rows


def check_prompt_column(rows: list[dict[str, Any]], name: str) -> None:
    """Fail early, naming the columns, when there is nothing to prompt with."""
    if not rows:
        raise ValueError(f"dataset {name!r} has no rows")
    cols = sorted(rows[0])
    if not any(c in rows[0] for c in ("prompt", "messages", "problem")):
        raise ValueError(f"dataset {name!r} has no 'prompt' or 'messages' column; its columns are {cols} "
                         "(a 'problem' column, the text of one user turn, also serves)")
    if "messages" in rows[0] and "prompt" not in rows[0]:
        if not any(m.get("role") == "user" for m in rows[0]["messages"]):
            raise ValueError(f"dataset {name!r}: 'messages' has no user turn to prompt with")
