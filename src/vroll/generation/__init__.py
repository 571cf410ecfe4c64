"""Generation: who samples the completions the trainer learns from, and how a batch of them is made.

- ``generator``: the ``Generator`` protocol (generate, push weights, end the sync, metrics, close);
- backends: ``server`` (a running ``vroll serve``), ``pool`` (several servers as one), ``colocate``
  (a vLLM engine in each training process), ``plain`` (``generate()`` on the policy);
- ``rollout``: ``Rollout``, the completions of a batch as every backend returns them;
- ``prompts``: prompts as token ids and images; ``planning``: which prompts a batch samples, and how;
- ``episodes``: multi-turn episodes in an environment, over any generator;
- ``async_generation``: generating the next batches while the trainer trains (server mode);
- ``rollouts``: ``Rollouts``, what the trainer's loop asks for: pushes, planning, sync or async
  generation, scoring, dynamic sampling and sample logging, one ``ScoredRollout`` at a time;
- ``clock``: the seconds of a step's phases; ``devices``: the rule that keeps a server off the
  trainer's GPUs; ``launcher``: ``vroll serve`` on the spare GPU (the guide's layout).

Nothing here reads the trainer's config: ``vroll.trainer.generators`` builds these from it.
"""
