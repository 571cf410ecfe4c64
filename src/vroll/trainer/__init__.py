"""Trainers: the loop that generates, scores, updates and syncs.

- ``config``: ``GRPOConfig`` / ``OnlineDPOConfig`` (flags, YAML, validation).
- ``data``: prompt datasets (Hub names, local files, the built-in addition task).
- ``rollout``: generation backends (a vroll server, or ``generate()`` on the policy)
  and the typed ``Rollout`` batch they return.
- ``policy``: per-token log-probabilities of completions under a model.
- ``grpo``: ``GRPOTrainer``; ``online_dpo``: ``OnlineDPOTrainer``.
- ``state``: run artifacts (metrics JSONL, reward curve, samples) and checkpoints.
- ``cli``: ``vroll grpo`` and ``vroll online-dpo``.
"""
