"""One optimizer step's metrics: over its micro-steps, over the processes, and as one line."""

from __future__ import annotations

from typing import Any

import torch

from vroll.rl.importance import Tally

# A pooled metric travels as two keys, its sum and its count: summed over micro-steps, averaged over processes
# (which leaves their ratio the pooled one), divided at the end (:func:`pooled_means`). Its mean is then exact
# over every token of the step, and a metric with nothing to count this step (a length bucket no completion
# reached) is left out of the line, not logged as 0.
POOLED_SUM, POOLED_COUNT = ":sum", ":count"


def pooled(prefix: str, tallies: dict[str, Tally]) -> dict[str, float]:
    """``{name: Tally(total, count)}`` as the two keys of each pooled metric ``prefix + name``."""
    return {f"{prefix}{name}{suffix}": value for name, tally in tallies.items()
            for suffix, value in ((POOLED_SUM, tally.total), (POOLED_COUNT, tally.count))}


def pooled_means(metrics: dict[str, float]) -> dict[str, float]:
    """Each pooled metric's two keys -> its mean (left out where its count is 0); other keys as they are."""
    out = {k: v for k, v in metrics.items() if not k.endswith((POOLED_SUM, POOLED_COUNT))}
    for key in metrics:
        if key.endswith(POOLED_SUM):
            name = key.removesuffix(POOLED_SUM)
            if (count := metrics[name + POOLED_COUNT]) > 0:
                out[name] = metrics[key] / count
    return out


def combine(rows: list[dict[str, float]]) -> dict[str, float]:
    """Micro-step metrics -> one per step: the mean, the max / min of ``*_max`` / ``*_min`` keys, the sum of a
    pooled metric's sum and count."""
    out = {}
    for key in {k for r in rows for k in r}:
        values = [r[key] for r in rows if key in r]
        out[key] = max(values) if key.endswith("_max") else min(values) if key.endswith("_min") else (
            sum(values) if key.endswith((POOLED_SUM, POOLED_COUNT)) else sum(values) / len(values))
    return out


def over_processes(metrics: dict[str, float], accelerator: Any) -> dict[str, float]:
    """Each process trains on its own share: its loss metrics are averaged over processes
    (``*_max`` / ``*_min`` ones take the max / min)."""
    if accelerator.num_processes == 1:
        return metrics

    def tensor(keys: list[str]) -> torch.Tensor:
        return torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=accelerator.device)

    keys = sorted(metrics)
    out = dict(zip(keys, accelerator.reduce(tensor(keys), reduction="mean").tolist(), strict=True))
    for suffix, op in (("_max", torch.distributed.ReduceOp.MAX), ("_min", torch.distributed.ReduceOp.MIN)):
        picked = [k for k in keys if k.endswith(suffix)]  # the same keys on every process
        if picked:
            extreme = tensor(picked)
            torch.distributed.all_reduce(extreme, op=op)
            out |= dict(zip(picked, extreme.tolist(), strict=True))
    return out


def summary(step: int, total: int, m: dict[str, float]) -> str:
    """The step's line in the log: rewards, loss, length and where its seconds went."""
    rewards = " ".join(f"{k.split('/')[1]}={v:.2f}" for k, v in sorted(m.items())
                       if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2)
    return (f"step {step}/{total} | reward {m.get('reward/mean', float('nan')):.3f} ({rewards}) | "
            f"loss {m.get('loss', float('nan')):.4f} | len {m.get('completion/mean_length', 0):.1f} | "
            f"{m['time/step_s']:.1f} s/step (gen {m.get('time/generate_s', 0):.1f}"
            + (f" in {m['dynamic/generations']:.0f} batches" if "dynamic/generations" in m else "") + ", "
            f"score {m.get('time/score_s', 0):.2f}, train {m.get('time/train_s', 0):.1f}, "
            f"sync {m.get('time/sync_s', 0):.2f}"
            + (f", waited {m['time/trainer_wait_s']:.1f}" if "time/trainer_wait_s" in m else "") + ")")
