"""``Clock``: where one optimizer step's seconds went, phase by phase.

Phases are ``generate``, ``score``, ``train``, ``sync`` (weight pushes) and ``trainer_wait``
(async generation: the trainer waiting for the generator); they are logged as ``time/<phase>_s``.
A phase that was entered, even for no time, is logged (``time/trainer_wait_s`` is 0.0, not
missing, for a step of an async run that never waited).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Clock:
    """Seconds per phase of one optimizer step; a new one each step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self._seconds[phase] = self._seconds.get(phase, 0.0) + seconds

    @contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        """Count the time inside the ``with`` block towards ``phase``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def seconds(self, phase: str) -> float:
        return self._seconds.get(phase, 0.0)

    def elapsed(self) -> float:
        """Seconds since the step began."""
        return time.perf_counter() - self.start

    def metrics(self) -> dict[str, float]:
        """``time/<phase>_s`` for every phase entered."""
        return {f"time/{phase}_s": s for phase, s in self._seconds.items()}
