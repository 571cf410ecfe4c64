"""Where the trainer's weights come from: ``(name, tensor)`` in checkpoint names.

A source declares its tensors up front (:meth:`metadata`: names, dtypes and full
shapes, without moving data) and then materializes them one bucket at a time
(:meth:`gather`). Sharded trainers plug in here: a DeepSpeed ZeRO-3 parameter is
gathered with ``GatheredParameters`` and an FSDP2 ``DTensor`` with ``full_tensor()``,
each only for the bucket being sent, so the whole model is never gathered at once.

Names are the base model's checkpoint names (what vLLM's ``load_weights`` expects):
wrappers (DDP's ``module.``, PEFT's ``base_model.model.`` and ``.base_layer``) are
stripped, LoRA adapters are merged into the base weights for the sync and unmerged
after it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from vroll.weightsync.buckets import TensorMeta, dtype_name
from vroll.weightsync.names import saved_names

_PEFT_PREFIX = "base_model.model."


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/accelerate wrappers (``.module``) to reach the model itself."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # type: ignore[assignment]
    return model


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_adapter")


def checkpoint_name(name: str, peft: bool) -> str | None:
    """The base model's name for a parameter name, or None for adapter-only tensors."""
    if not peft:
        return name
    if "lora_" in name or ".original_module." in name:
        return None  # adapters are merged into the base weight; originals are shadowed
    name = name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    ds_shape = getattr(param, "ds_shape", None)  # DeepSpeed ZeRO-3 keeps the full shape here
    return tuple(ds_shape) if ds_shape is not None else tuple(param.shape)


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


class ModelSource:
    """Weights of a transformers model (plain, DDP-wrapped, PEFT, ZeRO-3 or FSDP2).

    Args:
        model: the training model (wrappers are fine).
        dtype: wire dtype (the server's serving dtype); tensors are cast on the fly.
        include: sync only the checkpoint names it accepts (e.g. not the frozen vision tower:
            ``lambda n: not vroll.weightsync.names.is_vision_weight(n)``); default: all.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, include: Callable[[str], bool] | None = None) -> None:
        self.model = unwrap(model)
        self.dtype = dtype
        self.peft = is_peft(self.model)
        self._params: dict[str, torch.Tensor] = {}
        # transformers >= 5 renames VLM weights in memory; the checkpoint has the saved names
        saved = saved_names(self.model.get_base_model() if self.peft else self.model)  # type: ignore[operator]
        for name, param in self.model.named_parameters():  # tied weights appear once
            target = checkpoint_name(saved.get(id(param), name), self.peft)
            if target is not None and (include is None or include(target)):
                self._params[target] = param

    def metadata(self) -> list[TensorMeta]:
        """Every tensor to send, in model order, without touching the data."""
        wire = dtype_name(self.dtype)
        return [TensorMeta(n, wire, _full_shape(p)) for n, p in self._params.items()]

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold for the whole sync: merges LoRA adapters in, and out again after."""
        if not self.peft:
            yield
            return
        self.model.merge_adapter()  # type: ignore[operator]
        try:
            yield
        finally:
            self.model.unmerge_adapter()  # type: ignore[operator]

    @contextlib.contextmanager
    def gather(self, names: Sequence[str], cast: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Full tensors for one bucket, valid inside the ``with`` block only.

        ``cast=False`` leaves them in the training dtype, for a caller that casts while
        copying anyway (``pack``): one pass over the bytes instead of two.
        """
        params = [self._params[n] for n in names]
        with self._gathered(params):
            out = {}
            for name, p in zip(names, params, strict=True):
                full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 DTensor
                out[name] = full.detach().to(self.dtype) if cast else full.detach()
            yield out

    @staticmethod
    def _gathered(params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
        zero3 = [p for p in params if _is_zero3(p)]
        if not zero3:
            return contextlib.nullcontext()
        import deepspeed  # only reached when the model is already partitioned by ZeRO-3

        return deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
