"""Plain state: a run's pending objects as tensors, numbers, strings, lists and dicts.

A checkpoint keeps what a run has generated but not yet trained on (the micro-batches of a
generation batch cut by the save, async generation's batches generated ahead). It stores them
as plain state, which ``torch.load(..., weights_only=True)`` reads back: no pickled classes, so
loading runs no code, and moving a class or a module does not break a saved run. Dataclasses and
pydantic models of the types the trainer lists (``OnlineTrainer.state_types``) are tagged with their
class name; tuples and PIL images (as PNG bytes) are tagged too; anything else is refused when the
checkpoint is written, not when it is read back.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable
from typing import Any

import torch
from pydantic import BaseModel

TYPE, TUPLE, PNG = "__type__", "__tuple__", "__png__"


def type_table(types: Iterable[type]) -> dict[str, type]:
    """Class name -> class, for :func:`to_state` and :func:`from_state`."""
    return {t.__name__: t for t in types}


def to_state(value: Any, types: dict[str, type]) -> Any:
    """``value`` as plain state; a dataclass or model whose class is not in ``types`` is a ``TypeError``."""
    if value is None or isinstance(value, bool | int | float | str | torch.Tensor):
        return value
    if isinstance(value, list):
        return [to_state(v, types) for v in value]
    if isinstance(value, tuple):
        return {TUPLE: [to_state(v, types) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) and not k.startswith("__") for k in value):
            raise TypeError(f"checkpoint: dict keys must be plain strings, got {sorted(map(repr, value))[:3]}")
        return {k: to_state(v, types) for k, v in value.items()}
    name = type(value).__name__
    if isinstance(value, BaseModel) or dataclasses.is_dataclass(value):
        if types.get(name) is not type(value):
            raise TypeError(f"checkpoint: a {name} is not among the trainer's state types "
                            f"({', '.join(sorted(types))}): add it to state_types to save it")
        if isinstance(value, BaseModel):
            return {TYPE: name, "json": value.model_dump(mode="json")}
        return {TYPE: name, **{f.name: to_state(getattr(value, f.name), types) for f in dataclasses.fields(value)
                               if f.metadata.get("checkpoint", True)}}
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image: lossless, as the trainer saw it
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return {PNG: torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)}
    raise TypeError(f"checkpoint: cannot store a {name} as plain state")


def from_state(state: Any, types: dict[str, type]) -> Any:
    """The value :func:`to_state` made ``state`` from (a class outside ``types`` is a ``ValueError``)."""
    if isinstance(state, list):
        return [from_state(v, types) for v in state]
    if not isinstance(state, dict):
        return state
    if TUPLE in state:
        return tuple(from_state(v, types) for v in state[TUPLE])
    if PNG in state:
        from PIL import Image

        with Image.open(io.BytesIO(state[PNG].numpy().tobytes())) as image:
            return image.copy()
    if TYPE not in state:
        return {k: from_state(v, types) for k, v in state.items()}
    cls = types.get(state[TYPE])
    if cls is None:
        raise ValueError(f"the checkpoint holds a {state[TYPE]}, which this trainer does not know "
                         f"({', '.join(sorted(types))})")
    if issubclass(cls, BaseModel):
        return cls.model_validate(state["json"])
    return cls(**{k: from_state(v, types) for k, v in state.items() if k != TYPE})
