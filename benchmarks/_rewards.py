"""Reward functions for speed benchmarks on random-weight models (no imports: loaded by spec).

A random-weight model never solves the addition task, so every group scores 0, and vroll then
trains no row at all (a group scored alike has no gradient) while TRL still runs them: the step
comparison would flatter vroll. ``vowel_share`` differs between any two random completions, so
every row is trained on both sides. Used as ``--reward_funcs _rewards:vowel_share`` with this
folder on ``PYTHONPATH`` (``grpo_step.py --reward vowels`` does both).
"""

from __future__ import annotations

from typing import Any


def vowel_share(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    """The fraction of each completion's characters that are vowels."""
    return [sum(ch in "aeiouAEIOU" for ch in c) / max(1, len(c)) for c in completions]
