"""A reward for speed runs on random-weight models (``--reward_funcs vowel_share``).

A random-weight model never solves a task, so a task's reward is 0 for every completion; every
group then scores alike, has no advantage, and GRPO trains no row at all, while a trainer that
does not skip such rows (TRL) still runs them: a step comparison would flatter vroll, and a run
would test less than it seems. ``vowel_share`` differs between almost any two random
completions, so every row is trained. It measures nothing about quality.
"""

from __future__ import annotations

from typing import Any

from vroll.rows import completion_text

VOWELS = frozenset("aeiou")


def vowel_share(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """The fraction of each completion's characters (a text, or TRL's message form) that are lowercase vowels
    (0.0 for an empty one)."""
    texts = [completion_text(c) for c in completions]
    return [sum(ch in VOWELS for ch in c) / max(1, len(c)) for c in texts]
