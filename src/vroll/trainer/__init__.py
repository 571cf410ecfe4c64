"""Trainers: the loop that generates, scores, updates and syncs.

- ``config``: ``GRPOConfig`` / ``OnlineDPOConfig`` (flags, YAML, validation).
- ``data``: prompt datasets (Hub names, local files, the built-in addition task).
- ``rollout``: generation backends (a vroll server, or ``generate()`` on the policy)
  and the typed ``Rollout`` batch they return; ``colocate``: a vLLM engine inside
  each training process; ``devices``: the rule that keeps a server off the trainer's GPUs.
- ``policy``: per-token log-probabilities of completions under a model.
- ``grpo``: ``GRPOTrainer``; ``online_dpo``: ``OnlineDPOTrainer``.
- ``base``: the loop every algorithm shares and its contract (``build`` micro-batches from a
  ``ScoredRollout``, ``loss`` on one); ``artifacts``: metrics JSONL, reward curve,
  samples, trackers; ``checkpoint``: save and exact resume.
"""
