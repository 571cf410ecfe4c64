"""Checkpoints that resume exactly: model, optimizer, scheduler, RNG, data position.

A checkpoint is ``<output_dir>/checkpoint-<step>/`` holding the model in Hugging Face
format (loadable on its own), and, unless ``save_only_model``, ``optimizer.pt``,
``scheduler.pt``, ``rng.pt`` and ``trainer_state.json``. Together with seeded sampling
on the server (seed + generation index), that makes a resumed run take the same
next batch and log the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

_CKPT = re.compile(r"checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Counters that, with the RNG, say where a run is."""

    global_step: int = 0
    micro_step: int = 0
    generation: int = 0
    sampler: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: Path, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
                    state: TrainerState, only_model: bool, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (a crash never leaves a half one)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    if not only_model:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"rng": rng_state(), **(extra or {})}, tmp / "rng.pt")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step ``checkpoint-N`` folder in ``output_dir``, if any."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := _CKPT.search(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def resolve_resume(value: str | None, output_dir: str) -> Path | None:
    """``None``, ``'latest'`` or a folder -> the checkpoint folder to resume from."""
    if value is None:
        return None
    path = latest_checkpoint(output_dir) if value == "latest" else Path(value)
    if path is None or not (path / "trainer_state.json").exists():
        raise ValueError(f"resume_from_checkpoint={value!r}: no checkpoint found "
                         f"(looked for {path or Path(output_dir) / 'checkpoint-N'})")
    if not (path / "optimizer.pt").exists():
        raise ValueError(f"{path} was saved with save_only_model=true: it has no optimizer/RNG state "
                         "to resume from; start a new run from it with --model_name_or_path instead")
    return path


def load_checkpoint(path: Path, optimizer: Any, scheduler: Any) -> tuple[TrainerState, dict[str, Any]]:
    """Restore optimizer, scheduler and RNG; returns the trainer state and extras."""
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    extra = torch.load(path / "rng.pt", weights_only=False)
    set_rng_state(extra.pop("rng"))
    state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    return state, extra
