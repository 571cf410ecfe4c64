"""How the training processes hold the model: one copy each (DDP), DeepSpeed ZeRO-2/3, or FSDP2.

All three go through accelerate, so one loop serves them:

- plain / DDP: ``accelerate launch`` or ``torchrun`` with no more flags;
- ``--deepspeed CONFIG.json``: an HF-style DeepSpeed config (configs/zero2.json, zero3.json) whose
  ``"auto"`` values are filled from the trainer's flags, through accelerate's DeepSpeed plugin;
- FSDP2: ``accelerate launch --config_file configs/fsdp2.yaml`` (accelerate passes it on in env vars).

Without a GPU, accelerate pairs neither DeepSpeed nor FSDP with its CPU state: DeepSpeed is
started with ``cpu=False`` and a gloo process group (DeepSpeed's CPU accelerator falls back to
gloo without oneCCL), FSDP2 by switching the multi-CPU state to FSDP before ``prepare``.

The model is loaded whole on every process and partitioned by ``prepare`` (no ``zero.Init``):
the reference model is then an exact copy of the initial policy, and LoRA wraps a whole model.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vroll.weightsync.source import is_peft
from vroll.world import ensure_distributed_env

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vroll.trainer.config import TrainConfig

log = logging.getLogger(__name__)

# DeepSpeed keys HF fills from the model's hidden size when they say "auto" (as transformers' Trainer does)
_HIDDEN_SIZE_KEYS = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                     "stage3_param_persistence_threshold": lambda h: 10 * h}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); without, torch emulates it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def mixed_precision(bf16: bool, cuda: bool) -> str:
    """accelerate's ``mixed_precision`` for ``--bf16``: bf16 on GPUs and on CPUs that compute it natively.

    Elsewhere autocast emulates bf16: a SmolLM2-135M forward+backward (4 x 100 tokens) took 89 s against
    3.3 s in fp32 on the 2-core AVX2 machine (``benchmarks/cpu_bf16.py``, ``results/cpu_bf16.json``), with
    no memory to gain that a CPU run needs, so the run trains in fp32 and says so once.
    """
    if not bf16 or cuda or native_cpu_bf16():
        return "bf16" if bf16 else "no"
    log.warning("--bf16: this CPU has no native bf16 (no AVX512-BF16 or AMX; torch would emulate it, ~27x "
                "slower): training in float32")
    return "no"


def make_accelerator(args: TrainConfig) -> Accelerator:
    """The run's ``Accelerator``: DDP, DeepSpeed (``--deepspeed``) or FSDP2 (accelerate's FSDP config)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mixed = mixed_precision(args.bf16, cuda)
    if args.deepspeed is None:
        accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
        if not cuda and _env_flag("ACCELERATE_USE_FSDP") and accelerator.num_processes > 1:
            _fsdp_on_cpu(accelerator)
        return accelerator
    if _env_flag("ACCELERATE_USE_FSDP"):
        raise ValueError("--deepspeed with an FSDP accelerate config: use one of the two")
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    ensure_distributed_env()
    # DeepSpeed calls these torch.distributed names on every gather: one warning per layer and step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`",
                            category=FutureWarning)
    plugin = DeepSpeedPlugin(hf_ds_config=fill_deepspeed_config(args, int(os.environ["WORLD_SIZE"])))
    # cpu=False even without CUDA: accelerate only pairs DeepSpeed with a device state; gloo carries it on CPU
    handlers = [] if cuda else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(mixed_precision=mixed, deepspeed_plugin=plugin, kwargs_handlers=handlers,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    unset_hf_deepspeed_config()  # from_pretrained loads the whole model (no zero.Init): see the module docstring
    log.info("DeepSpeed ZeRO-%d over %d process(es) (%s)", zero_stage(accelerator), accelerator.num_processes,
             args.deepspeed)
    return accelerator


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """accelerate turns FSDP on for device states only; FSDP2 itself runs on CPU tensors over gloo."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads accelerate launch's FSDP_* env vars
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPU: only FSDP2 (fsdp_version: 2, as in configs/fsdp2.yaml)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # as accelerate does for device states: the partial state too, or the next AcceleratorState() reverts it
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def fill_deepspeed_config(args: TrainConfig, world_size: int) -> dict[str, Any]:
    """The ``--deepspeed`` JSON with its ``"auto"`` values taken from the trainer's flags.

    ``bf16``/``fp16`` ``"auto"`` are left to accelerate (from ``--bf16``). ZeRO-3 gathers 16-bit
    weights on save, since every checkpoint is a Hugging Face folder. Offloading the optimizer
    runs vroll's torch AdamW on the CPU (DeepSpeed refuses a client optimizer there unless told).
    """
    cfg = args.deepspeed_config()
    top = {"train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
           "gradient_accumulation_steps": args.gradient_accumulation_steps,
           "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
           "gradient_clipping": args.max_grad_norm}
    for key, value in top.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    zero = cfg["zero_optimization"]
    hidden = _hidden_size(args) if any(zero.get(k) == "auto" for k in _HIDDEN_SIZE_KEYS) else None
    for key, rule in _HIDDEN_SIZE_KEYS.items():
        if zero.get(key) == "auto" and hidden is not None:
            zero[key] = rule(hidden)
    if zero.get("stage") == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            log.info("--deepspeed: stage3_gather_16bit_weights_on_model_save set to true (vroll saves HF folders)")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    return cfg


def _hidden_size(args: TrainConfig) -> int | None:
    """The (text) hidden size from the model's config, for the size-based ``"auto"`` keys."""
    try:
        from transformers import AutoConfig

        from vroll.models import resolve_model

        config = AutoConfig.from_pretrained(resolve_model(args.model_name_or_path))
        return int(config.get_text_config().hidden_size)
    except (OSError, ValueError, AttributeError):
        return None  # accelerate fills them from model.config at prepare, or says which to set


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.deepspeed_config["zero_optimization"].get("stage", 0))


def is_fsdp(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether model or optimizer state is split over processes (ZeRO-1/2/3 or FSDP)."""
    return is_fsdp(accelerator) or (zero_stage(accelerator) or 0) > 0


def backward(accelerator: Accelerator, loss: torch.Tensor, last: bool) -> None:
    """Backpropagate one micro-step; ``last``: it ends the accumulation window.

    DeepSpeed steps its optimizer inside backward at the window's end, so it is told where that is;
    vroll's loss already carries the accumulation normalizer, so DeepSpeed must not divide again.
    """
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        accelerator.backward(loss)
    else:
        wrapped.backward(loss, sync_gradients=last, scale_wrt_gas=False)


def agree_max(accelerator: Accelerator, counts: list[int]) -> list[int]:
    """Each count's maximum over the processes (one all-reduce; one process: the counts themselves): how many
    micro-batches every process runs, since DDP, ZeRO and FSDP reduce inside each forward and backward."""
    if accelerator.num_processes == 1 or not counts:
        return list(counts)
    tensor = torch.tensor(counts, dtype=torch.long, device=accelerator.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def as_float(norm: Any) -> float:
    """A gradient norm as a float (FSDP2 returns a replicated DTensor, DeepSpeed a float or None)."""
    if norm is None:
        return 0.0
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def reference_model(policy: nn.Module, accelerator: Accelerator) -> nn.Module:
    """A frozen copy of the initial policy for the KL term, held the way the policy is (ZeRO-3
    partitions it, FSDP2 shards it); call it before ``accelerator.prepare`` of the policy."""
    ref = copy.deepcopy(policy)
    if is_peft(ref):  # the base model without adapters (a resumed LoRA run's adapters are trained ones)
        ref = ref.unload()
    ref = ref.eval().requires_grad_(False)
    stage = zero_stage(accelerator)
    if stage is not None:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        config["zero_optimization"] = {"stage": 3 if stage == 3 else 0} | (
            {k: v for k, v in config["zero_optimization"].items() if k.startswith(("stage3", "offload_param"))}
            if stage == 3 else {})
        for key in ("optimizer", "scheduler", "zero_force_ds_cpu_optimizer"):
            config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=ref, config=config)
        engine.eval()  # DeepSpeedEngine.eval() returns None
        return engine
    if is_fsdp(accelerator):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, ref).eval()
    return ref.to(accelerator.device)
