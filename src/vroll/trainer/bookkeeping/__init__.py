"""What a run keeps: its artifacts and metrics, its trackers, its checkpoints.

- ``artifacts``: ``metrics.jsonl``, ``samples.jsonl``, ``reward_curve.png``, config, trackers;
- ``tracking``: ``--report_to wandb`` that logs offline where there is no network;
- ``step_metrics``: one step's metrics, over micro-steps and processes, and its one-line summary;
- ``checkpoint``: versioned checkpoints that resume exactly.
"""
