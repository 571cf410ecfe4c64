"""Trainers: the loop that generates, scores, updates and syncs, and its algorithms.

- ``config``: ``GRPOConfig`` / ``OnlineDPOConfig`` (TRL's flag names, YAML, validation; the engine's
  ``--vllm_*`` flags nest ``vroll.engine.config.EngineConfig``).
- ``data``: prompt datasets (Hub names, local files, a task's own rows).
- ``base``: ``OnlineTrainer``, the loop, the optimizer and the checkpoints; an algorithm is ``build``
  (micro-batches from a ``ScoredRollout``) and ``loss`` on one.
- algorithms: ``grpo`` (``GRPOTrainer``), ``rloo`` (``RLOOTrainer``), ``online_dpo``
  (``OnlineDPOTrainer``); ``logps``: token batches and their per-token log-probabilities.
- ``generators``: the generation a config asks for (``vroll.generation``'s backends and ``Rollouts``).
- ``model/``: loading the policy, vision towers, LoRA, DDP / ZeRO / FSDP2.
- ``bookkeeping/``: metrics, samples, plots, trackers and checkpoints.
"""
