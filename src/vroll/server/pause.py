"""vLLM's ``/pause`` and ``/resume`` on ``vroll serve``: a gate in front of generation.

``vroll serve`` needs no pause to keep versions apart: a weight load is a barrier job in each replica
(``vroll.server.replica``), so no completion mixes two versions. A trainer pauses so that nothing
*new* starts on the old weights while it pushes (TRL's async GRPO client pauses with ``mode=keep``
around every push). What each mode does here:

- every mode holds new generation requests at the door until ``/resume``; they then run on the
  weights served at that time (requests refused by their checks are still refused at once);
- ``wait``: ``/pause`` answers once the generations in flight have finished;
- ``keep``: ``/pause`` answers at once; the generations in flight finish on the weights they started
  with (vLLM freezes them and resumes them on the new weights, one completion from two versions:
  vroll does not);
- ``abort``: the generations in flight are aborted in the engine, their clients get a 503 that says
  to send again (TRL's client retries a 503; the retry waits for ``/resume``), then ``/pause`` answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

PauseMode = Literal["abort", "wait", "keep"]


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


@dataclass
class PauseGate:
    """Admits generation requests while running; counts those in flight (``/pause`` waits on them)."""

    running: asyncio.Event = field(default_factory=_set_event)  # cleared by /pause, set by /resume
    idle: asyncio.Event = field(default_factory=_set_event)  # no generation in flight
    inflight: int = 0
    aborts: int = 0  # /pause?mode=abort calls so far: a generation admitted before the last one is aborted

    @property
    def paused(self) -> bool:
        return not self.running.is_set()

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Callable[[], bool]]:
        """Wait until the server runs, then count this generation in flight; yields ``aborted()``."""
        while not self.running.is_set():  # a pause right after a resume holds the woken ones again
            await self.running.wait()
        epoch = self.aborts
        self.inflight += 1
        self.idle.clear()
        try:
            yield lambda: self.aborts != epoch
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    async def pause(self, mode: PauseMode) -> None:
        """Hold new generations; ``wait``/``abort`` return once none is in flight."""
        self.running.clear()
        if mode == "abort":
            self.aborts += 1
        if mode != "keep":
            await self.idle.wait()

    def resume(self) -> None:
        self.running.set()
