"""Model preparation: the policy as the loop trains it.

- ``policy``: load the policy and its tokenizer (a checkpoint's weights when resuming);
- ``vision``: a vision-language policy's auto class and frozen vision tower;
- ``lora``: PEFT adapters from TRL's ``--lora_*`` flags;
- ``distributed``: how the processes hold it (DDP, DeepSpeed ZeRO-2/3, FSDP2, through accelerate).
"""
