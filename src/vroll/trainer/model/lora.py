"""LoRA from the command line, with TRL's flag names (``--use_peft --lora_r --lora_alpha ...``).

The policy is wrapped in PEFT adapters after loading and before ``accelerator.prepare`` (so it
works under ZeRO-3 and FSDP2 too). The weight sync sends the base weights with the adapters
merged in (``vroll.weightsync.source``); checkpoints and ``final/`` hold the adapters in PEFT's
format (``adapter_config.json`` + ``adapter_model.safetensors``), and a resumed run loads them
back onto the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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


def apply_lora(model: nn.Module, args: TrainConfig, checkpoint: str | Path | None = None) -> nn.Module:
    """``model`` with trainable LoRA adapters when ``--use_peft`` (the checkpoint's, when resuming)."""
    if not args.use_peft:
        return model
    from peft import PeftModel, get_peft_model

    if checkpoint is not None and (Path(checkpoint) / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    else:
        try:
            model = get_peft_model(model, lora_config(args))
        except ValueError as exc:  # e.g. target modules not found: PEFT names the problem
            raise ValueError(f"--use_peft: {exc}") from None
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model
