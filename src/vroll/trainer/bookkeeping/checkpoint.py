"""Checkpoints that resume exactly: model, optimizer, scheduler, RNG, data position.

A checkpoint is ``<output_dir>/checkpoint-<step>/`` holding the model in Hugging Face
format (loadable on its own; with LoRA, the adapters), ``trainer_state.json`` and, unless
``save_only_model``, ``optimizer.pt`` (ZeRO/FSDP: ``sharded/``, every process's shard of
model and optimizer), ``scheduler.pt`` and ``rng.pt`` (``rng-<rank>.pt`` for the other
processes), which also holds that process's pending state (micro-batches of a generation batch
cut by the save, async batches generated ahead). Together with seeded sampling on the server
(seed + generation index), that makes a resumed run take the same next batch and log the same
metrics as an uninterrupted one.

Versioned plain state: ``trainer_state.json`` names its ``checkpoint_format`` (:data:`FORMAT`);
every ``.pt`` file holds tensors, numbers and strings only (``vroll.trainer.bookkeeping.state``) and
is read with ``torch.load(..., weights_only=True)``. Format 1 (vroll before 2026-12-07, no
``checkpoint_format``) pickled trainer objects: one saved at a step boundary of a synchronous run
still loads; one holding pickled batches is refused with a message naming its format.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vroll.trainer.model.distributed import is_sharded

if TYPE_CHECKING:
    from accelerate import Accelerator

FORMAT = 2  # trainer_state.json's checkpoint_format: plain state, read with weights_only=True
_CKPT = re.compile(r"checkpoint-(\d+)$")
SHARDED_DIR = "sharded"  # accelerate's save_state of a ZeRO/FSDP run: every process's shard


@dataclass
class TrainerState:
    """Counters that, with the RNG, say where a run is."""

    global_step: int = 0
    micro_step: int = 0
    generation: int = 0
    sampler: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})


def rng_state() -> dict[str, Any]:
    """This process's random streams (Python, NumPy, torch) as plain state."""
    version, ints, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(ints), gauss],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, ints, gauss = state["python"]
    random.setstate((version, tuple(ints), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # format 1 kept NumPy's array
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save_model(path: Path, accelerator: Accelerator, model: Any, tokenizer: Any) -> None:
    """The model as a Hugging Face folder (with LoRA: the adapters, in PEFT's format).

    Every process calls it: ZeRO-3 and FSDP2 gather the weights collectively, the main process writes.
    """
    state_dict = None
    if is_sharded(accelerator):
        # on CPU, torch's full FSDP2 state dict still holds DTensors: gather them (a collective, in order)
        # (ZeRO-3 returns None on the other processes)
        state_dict = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                      for k, v in (accelerator.get_state_dict(model) or {}).items()}
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(path)


def save_checkpoint(path: Path, accelerator: Accelerator, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
                    state: TrainerState, only_model: bool, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (a crash never leaves a half one); every process calls it.

    ``extra`` is this process's own plain state (``vroll.trainer.bookkeeping.state.to_state``: its
    pending micro-batches, say): each process keeps its RNG and extras in its own file. A sharded run
    (ZeRO, FSDP) also writes every process's shard of the model and optimizer state under ``sharded/``
    (accelerate's ``save_state``).
    """
    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_model(tmp, accelerator, model, tokenizer)
    if not only_model:
        if is_sharded(accelerator):
            accelerator.save_state(str(tmp / SHARDED_DIR))
        elif accelerator.is_main_process:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"rng": rng_state(), **(extra or {})}, tmp / _rng_file(accelerator.process_index))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"checkpoint_format": FORMAT, **asdict(state)}, indent=2))
        if not only_model:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    accelerator.wait_for_everyone()
    return path


def _rng_file(process_index: int) -> str:
    return "rng.pt" if process_index == 0 else f"rng-{process_index}.pt"


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
    if not (path / "optimizer.pt").exists() and not (path / SHARDED_DIR).is_dir():
        raise ValueError(f"{path} was saved with save_only_model=true: it has no optimizer/RNG state "
                         "to resume from; start a new run from it with --model_name_or_path instead")
    return path


def load_weights(model: Any, path: Path) -> None:
    """Copy a checkpoint's weights into ``model`` (the initial policy, already built the same way)."""
    saved = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())


def load_checkpoint(path: Path, accelerator: Accelerator, optimizer: Any,
                    scheduler: Any) -> tuple[TrainerState, dict[str, Any]]:
    """Restore optimizer (with a sharded run: model and optimizer shards), scheduler and this
    process's RNG; returns the trainer state and this process's extras (plain state)."""
    saved = json.loads((path / "trainer_state.json").read_text())
    version = saved.pop("checkpoint_format", 1)
    if version not in (1, FORMAT):
        raise ValueError(f"{path} is a checkpoint of format {version}; this vroll reads formats 1 and {FORMAT}: "
                         "resume it with the vroll that wrote it")
    sharded = (path / SHARDED_DIR).is_dir()
    if sharded != is_sharded(accelerator):
        raise ValueError(
            f"{path} was written by a {'sharded (DeepSpeed ZeRO / FSDP)' if sharded else 'DDP'} run; resume it with "
            "the same --deepspeed / accelerate config (and number of processes) it was written with")
    if sharded:
        accelerator.load_state(str(path / SHARDED_DIR))
    else:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    own = path / _rng_file(accelerator.process_index)
    extra = _load_extras(own if own.exists() else path / "rng.pt", version)
    set_rng_state(extra.pop("rng"))
    return TrainerState(**saved), extra


def _load_extras(file: Path, version: int) -> dict[str, Any]:
    """A process's RNG and extras. Format 1 pickled them: its NumPy RNG array is allowed, trainer objects
    (the batches of a save mid-way through a generation batch, or async ones) are not."""
    if version == FORMAT:
        return torch.load(file, weights_only=True)
    numpy_array = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        with torch.serialization.safe_globals(numpy_array):
            return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as exc:
        what = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "objects")
        raise ValueError(
            f"{file.parent} is a checkpoint of format 1 (vroll before 2026-12-07), saved with pickled trainer "
            f"objects ({what}: batches generated but not yet trained on), which this vroll no longer reads. Resume it "
            f"with the vroll that wrote it, or start a new run from its weights (--model_name_or_path "
            f"{file.parent})") from None
