"""What a run leaves in its ``output_dir``: metrics, samples, a reward curve, trackers.

- ``metrics.jsonl``: one JSON object per logged optimizer step.
- ``samples.jsonl``: a few prompts and completions with their rewards per generation.
- ``reward_curve.png``: reward per step (each reward function and the total).
- TensorBoard (``<output_dir>/tb``) and W&B, when asked for with ``report_to``.
Only the main process writes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunArtifacts:
    """Writers for one run's metrics, samples and plots."""

    def __init__(self, output_dir: str | Path, enabled: bool, report_to: list[str], run_name: str | None,
                 config: dict[str, Any]) -> None:
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.trackers: list[Any] = []
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self._open_trackers(report_to, run_name, config)

    def _open_trackers(self, report_to: list[str], run_name: str | None, config: dict[str, Any]) -> None:
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.trackers.append(SummaryWriter(str(self.dir / "tb")))
        if "wandb" in report_to:  # offline, saying so, where there is no network (vroll.trainer.bookkeeping.tracking)
            from vroll.trainer.bookkeeping.tracking import open_wandb

            self.trackers.append(open_wandb(run_name, config, self.dir))

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint, as if never interrupted."""
        for path in (self.metrics_path, self.dir / "samples.jsonl"):
            if self.enabled and path.exists():
                keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
                path.write_text("".join(ln + "\n" for ln in keep))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            if hasattr(tracker, "add_scalar"):
                for k, v in metrics.items():
                    tracker.add_scalar(k, v, step)
            else:
                tracker.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if self.enabled and rows:
            with (self.dir / "samples.jsonl").open("a") as fh:
                for row in rows:
                    fh.write(json.dumps({"step": step, **row}, default=str) + "\n")

    def plot_rewards(self) -> Path | None:
        """``reward_curve.png`` from ``metrics.jsonl`` (every ``reward*`` mean)."""
        if not self.enabled or not self.metrics_path.exists():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(ln) for ln in self.metrics_path.read_text().splitlines()]
        keys = sorted({k for r in rows for k in r
                       if (k.startswith("reward") and k.endswith("mean")) or k == "eval/accuracy"})
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            style = dict(marker="o", ls="--") if key == "eval/accuracy" else {}  # sparse: every eval_steps
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, lw=2 if key == "reward/mean" else 1, **style)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reward")
        ax.set_title(f"reward per step: {self.dir.name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = self.dir / "reward_curve.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        for tracker in self.trackers:
            (tracker.close if hasattr(tracker, "close") else tracker.finish)()
        self.trackers = []


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value
