"""LoRA from the command line, with TRL's flag names (``--use_peft --lora_r --lora_alpha ...``), or from
TRL's ``peft_config=`` (a ``peft.LoraConfig``, used as is; its values are recorded in the ``lora_*`` fields).

The policy is wrapped in PEFT adapters after loading and before ``accelerator.prepare`` (so it
works under ZeRO-3 and FSDP2 too). The weight sync sends the base weights with the adapters
merged in (``vroll.weightsync.source``), or with ``--vllm_lora_sync adapter`` the adapter's factors
alone (``adapter_push``), which vLLM serves with its LoRA kernels; checkpoints and ``final/`` hold
the adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), and a resumed run loads them
back onto the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from vroll.trainer.config import TrainConfig


def lora_config(args: TrainConfig):  # noqa: ANN201 (peft is optional)
    """The ``peft.LoraConfig`` of the flags (``all-linear`` as PEFT spells it)."""
    from peft import LoraConfig

    targets: list[str] | str | None = args.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, modules_to_save=args.lora_modules_to_save,
                      task_type=args.lora_task_type)


def record(args: TrainConfig, config: Any) -> None:
    """A ``peft_config``'s values in the ``lora_*`` fields, so ``config.json`` says what was trained."""
    targets = config.target_modules
    args.use_peft = True
    args.lora_r, args.lora_alpha, args.lora_dropout = config.r, config.lora_alpha, config.lora_dropout
    args.lora_target_modules = [targets] if isinstance(targets, str) else None if targets is None else sorted(targets)
    args.lora_modules_to_save = None if config.modules_to_save is None else list(config.modules_to_save)
    args.lora_task_type = str(getattr(config.task_type, "value", config.task_type))


def apply_lora(model: nn.Module, args: TrainConfig, checkpoint: str | Path | None = None,
               peft_config: Any = None) -> nn.Module:
    """``model`` with trainable LoRA adapters when ``--use_peft`` or a ``peft_config`` is given (the
    checkpoint's, when resuming)."""
    if not args.use_peft and peft_config is None:
        return model
    from peft import PeftConfig, PeftModel, get_peft_model

    if peft_config is not None:
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(f"peft_config must be a peft.LoraConfig (or another PeftConfig), got "
                            f"{type(peft_config).__name__}; or set use_peft=True and the lora_* fields")
        if hasattr(peft_config, "lora_alpha"):
            record(args, peft_config)
    if checkpoint is not None and (Path(checkpoint) / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    else:
        try:
            model = get_peft_model(model, peft_config or lora_config(args))
        except ValueError as exc:  # e.g. target modules not found: PEFT names the problem
            raise ValueError(f"{'peft_config' if peft_config else '--use_peft'}: {exc}") from None
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


def load_adapters(model: nn.Module, checkpoint: Path) -> None:
    """A LoRA checkpoint's adapter weights into ``model`` (a ``PeftModel`` built the same way)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = checkpoint / "adapter_model.safetensors"
    if not path.exists():
        raise ValueError(f"{checkpoint} has no adapter_model.safetensors: it was not written by a LoRA run")
    result = set_peft_model_state_dict(model, load_file(path))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{checkpoint}: its adapters do not fit this model's (e.g. {result.unexpected_keys[0]})")
