"""Where the trainer's weights come from: ``(name, tensor)`` in checkpoint names.

A source declares its tensors up front (:meth:`metadata`: names, dtypes and full
shapes, without moving data) and then materializes them one bucket at a time
(:meth:`gather`). Sharded trainers plug in here: a DeepSpeed ZeRO-3 parameter is
gathered with ``GatheredParameters`` and an FSDP2 ``DTensor`` with ``full_tensor()``,
each only for the bucket being sent, so the whole model is never gathered at once.

Names are the base model's checkpoint names (what vLLM's ``load_weights`` expects):
wrappers (DDP's ``module.``, PEFT's ``base_model.model.`` and ``.base_layer``) are
stripped, and LoRA adapters are added to their base weights bucket by bucket.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vroll.protocol import TensorMeta
from vroll.weightsync.buckets import dtype_name
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


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 ``DTensor`` is all-gathered (a collective); others are whole already
    (ZeRO-3 ones inside ``GatheredParameters``)."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


@dataclass
class LoraDelta:
    """What one LoRA-wrapped layer adds to its base weight: ``sum_a transpose(B_a @ A_a) * scale_a``."""

    a: list[torch.Tensor]  # (r, in) per active adapter
    b: list[torch.Tensor]  # (out, r)
    scale: list[float]
    transpose: bool  # fan_in_fan_out layers and embeddings store the weight transposed

    def tensors(self) -> list[torch.Tensor]:
        return [*self.a, *self.b]

    def compute(self) -> torch.Tensor:
        """The delta in float32, from the full factors (gathered by the caller)."""
        total = None
        for a, b, scale in zip(self.a, self.b, self.scale, strict=True):
            delta = (_full(b).float() @ _full(a).float()) * scale
            total = delta if total is None else total + delta
        assert total is not None
        return total.T if self.transpose else total


def _lora_deltas(model: nn.Module, saved: dict[int, str]) -> dict[str, LoraDelta]:
    """Base-weight name -> the unmerged LoRA adapters on it, for every LoRA layer of a PEFT model.

    Named like the base weights themselves (``saved``: transformers' checkpoint names, which differ
    from the in-memory ones for vision-language models), so each delta meets its weight.
    """
    from peft.tuners.lora import Embedding, Linear, LoraLayer

    out: dict[str, LoraDelta] = {}
    for module_name, m in model.named_modules():
        if not isinstance(m, LoraLayer) or m.disable_adapters:
            continue
        active = [a for a in m.active_adapters if a not in m.merged_adapters and (a in m.lora_A or
                                                                                 a in m.lora_embedding_A)]
        if not active:
            continue
        if not isinstance(m, (Linear, Embedding)) or any(m.use_dora.get(a, False) for a in active):
            raise ValueError(f"weight sync: LoRA on {module_name} ({type(m).__name__}"
                             f"{', DoRA' if any(m.use_dora.get(a) for a in active) else ''}) cannot be merged per "
                             "bucket; adapt Linear or Embedding layers with plain LoRA")
        base = m.get_base_layer().weight
        name = checkpoint_name(saved.get(id(base), f"{module_name}.base_layer.weight"), peft=True)
        assert name is not None
        if isinstance(m, Embedding):
            a, b = [m.lora_embedding_A[x] for x in active], [m.lora_embedding_B[x] for x in active]
            transpose = True
        else:
            a, b = [m.lora_A[x].weight for x in active], [m.lora_B[x].weight for x in active]
            transpose = bool(m.fan_in_fan_out)
        out[name] = LoraDelta(a, b, [float(m.scaling[x]) for x in active], transpose)
    return out


class ModelSource:
    """Weights of a transformers model (plain, DDP-wrapped, PEFT, ZeRO-3 or FSDP2).

    Args:
        model: the training model (wrappers are fine).
        dtype: wire dtype (the server's serving dtype); tensors are cast on the fly.
        include: sync only the checkpoint names it accepts (e.g. not the frozen vision tower:
            ``lambda n: not vroll.weightsync.names.is_vision_weight(n)``); default: all.

    With LoRA, each adapted weight is sent as ``W + B @ A * scale``, computed from the bucket's
    own gathered tensors: nothing is merged into the model, so nothing is unmerged after, and a
    ZeRO-3/FSDP2 model never has to be gathered whole.
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
        self._lora = _lora_deltas(self.model, saved) if self.peft else {}
        lost = [n for n in self._lora if n not in self._params and (include is None or include(n))]
        if lost:  # a delta that meets no weight would be dropped silently: the server would serve the base
            raise ValueError(f"weight sync: LoRA adapters on {lost[:3]} match no weight to send")
        self.sharded = any(_is_zero3(p) or hasattr(p, "full_tensor") for p in self.model.parameters())

    def metadata(self) -> list[TensorMeta]:
        """Every tensor to send, in model order, without touching the data."""
        wire = dtype_name(self.dtype)
        return [TensorMeta(n, wire, _full_shape(p)) for n, p in self._params.items()]

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold for the whole sync (LoRA needs nothing here any more: it is merged per bucket)."""
        yield

    @contextlib.contextmanager
    def gather(self, names: Sequence[str], cast: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Full tensors for one bucket, valid inside the ``with`` block only.

        A collective when the model is sharded: every process of the training job must call it
        with the same names, in the same order. ``cast=False`` leaves the tensors in the training
        dtype, for a caller that casts while copying anyway (``pack``): one pass instead of two.
        """
        params = [self._params[n] for n in names]
        factors = [t for n in names if n in self._lora for t in self._lora[n].tensors()]
        with self._gathered(params + factors):
            out = {}
            for name, p in zip(names, params, strict=True):
                full = _full(p).detach()
                if name in self._lora:
                    full = (full.float() + self._lora[name].compute()).to(full.dtype)
                out[name] = full.to(self.dtype) if cast else full
            yield out

    @staticmethod
    def _gathered(params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
        zero3 = [p for p in params if _is_zero3(p)]
        if not zero3:
            return contextlib.nullcontext()
        import deepspeed  # only reached when the model is already partitioned by ZeRO-3

        return deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)


@dataclass
class AdapterPush:
    """What an adapter-only sync sends: the LoRA factors in PEFT's names, and the config vLLM builds them with."""

    tensors: dict[str, torch.Tensor]
    config: dict  # r, lora_alpha, target_modules (PEFT's adapter_config.json fields vLLM reads)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def adapter_push(model: nn.Module, dtype: torch.dtype) -> AdapterPush:
    """The active LoRA adapter of a PEFT model, detached copies cast to ``dtype`` (the serving dtype).

    Only the factors move: a base model that never changes is already the served checkpoint.
    ``modules_to_save`` would change base weights too, and a sharded (ZeRO-3/FSDP2) model's
    factors would need gathering: both are refused here (use the merged sync) rather than
    silently served wrong.
    """
    from peft import get_peft_model_state_dict

    model = unwrap(model)
    if not is_peft(model):
        raise ValueError("--vllm_lora_sync adapter needs a LoRA (PEFT) model: pass --use_peft")
    name = model.active_adapter  # type: ignore[attr-defined]
    config = model.peft_config[name]  # type: ignore[index]
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"--vllm_lora_sync adapter does not send --lora_modules_to_save "
                         f"({config.modules_to_save}) yet: use --vllm_lora_sync merged")
    if getattr(config, "use_dora", False):
        raise ValueError("--vllm_lora_sync adapter: vLLM serves plain LoRA, not DoRA; use --vllm_lora_sync merged")
    if any(_is_zero3(p) or hasattr(p, "full_tensor") for p in model.parameters()):
        raise ValueError("--vllm_lora_sync adapter does not gather a sharded (ZeRO-3/FSDP2) adapter yet: "
                         "use --vllm_lora_sync merged")
    state = get_peft_model_state_dict(model, adapter_name=name)
    tensors = {k: v.detach().to(dtype, copy=True) for k, v in state.items()}
    targets = config.target_modules
    spec = dict(r=config.r, lora_alpha=config.lora_alpha, use_rslora=bool(getattr(config, "use_rslora", False)),
                target_modules=sorted(targets) if isinstance(targets, (set, list)) else targets)
    return AdapterPush(tensors, spec)


class AdapterSource:
    """An :class:`AdapterPush` as a sender's source (``metadata``/``gather``, like :class:`ModelSource`), so the
    bucketed push carries adapter factors over the same process groups; ``lora`` goes with the plan."""

    sharded = False  # adapter_push refuses a sharded model

    def __init__(self, push: AdapterPush) -> None:
        self.push = push
        self.lora: dict | None = push.config

    def metadata(self) -> list[TensorMeta]:
        return [TensorMeta(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in self.push.tensors.items()]

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def gather(self, names: Sequence[str], cast: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        yield {n: self.push.tensors[n] for n in names}  # already detached copies in the wire dtype
