"""Weight sync: the trainer's new weights to every worker of every replica.

- ``buckets``: flat dtype-homogeneous buckets and the plan both sides agree on.
- ``source``: the trainer's tensors in checkpoint names (plain, PEFT, ZeRO-3, FSDP2).
- ``group``: the trainer + workers process group (gloo on CPU, NCCL on GPU).
- ``sender``: ``WeightSender``, the trainer's side of one sync, step by step; ``push_all``, one sync
  to several servers (bucket by bucket to every group).
"""
