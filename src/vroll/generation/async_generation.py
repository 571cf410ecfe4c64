"""Async generation (server mode): the next batches are generated while the trainer trains.

``--async_generation true --max_staleness K`` (K >= 1; TRL AsyncGRPO's name). The main
training process holds an :class:`AsyncRollouts`: a producer thread that sends generation
requests to the server one at a time, ahead of the trainer, and a table of finished batches
the trainer takes in order. Versions are counted in pushes: ``p`` = weight pushes so far
(the first push, before any generation, is 1; with one generation batch per optimizer step,
push ``p`` carries the weights after step ``p - 1``).

Ordering at each generation-batch boundary ``g`` of the trainer (K = 1, one batch per step)::

    trainer, main thread                              producer thread -> server
    1. wait until the producer is idle             <- finishes batch g (weights p - 1)
       (time/trainer_wait_s)
    2. push the weights (every process) -> p          idle (async/generator_idle_frac)
    3. hand out batch g + 1                         -> generates batch g + 1 with weights p ...
    4. take batch g, check staleness (1), score,      ... while the trainer trains on batch g
       build, train -> weights p + 1

In general, after push ``p`` the producer may generate every batch a synchronous run would
generate after push ``p + K`` at the latest (:meth:`Schedule.push_before`), so at most K
batches are ever ahead of the trainer and staleness (pushes since the weights that sampled
a completion) is at most K by construction. The check at step 4 is the safety net for what
the schedule cannot promise: a replica restarted with its initial weights, a push from
elsewhere. A batch with a completion more than K pushes old is dropped (counted in
``async/dropped_samples``) and generated again, at once, with the current weights.

Why wait at step 1 instead of letting the server order the push after the batch in flight
(its replicas drain generates before a weight job, ``vroll.server.replica``): the generator
has to finish that batch before loading new weights either way, so nothing is lost; the
wait is then counted where it belongs (the trainer's, not the sync's), and every batch is
generated with exactly the weights the schedule planned for it. That makes runs
reproducible (same seeds, same versions) and resume exact. Pausing in-flight requests and
resuming them on new weights (TRL AsyncGRPO) is not used: a completion would then mix two
policies, and only the push itself (short next to a generation) would overlap.

This is verl's one-step-off-policy ordering for K = 1 (wait for batch t, sync weights,
launch batch t + 1, train on t) and prime-rl's ``async_level`` bound for larger K; the
samples' drift is corrected with the sampler's logprobs by importance sampling
(``vroll.rl.importance.importance_weights``), which async mode requires to be on for GRPO.
Online DPO needs no correction (its loss is off-policy by design).

Checkpoints: saving waits for the producer to finish what it was handed (the next step
would wait for it anyway) and stores the generated, not yet trained batches with their
versions, the push count and the prompt sampler's position; the trainer state's sampler
position is the one before those batches, so a synchronous run can resume from an async
checkpoint too. Resuming puts the batches back: the resumed run trains on the very samples
the uninterrupted one would have (exact resume).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vroll.batching import UNKNOWN_VERSION
from vroll.generation.clock import Clock
from vroll.generation.planning import Planned
from vroll.generation.rollout import Rollout

log = logging.getLogger(__name__)


@dataclass
class Generated:
    """A planned batch and its completions; ``versions``: per completion, the push that sampled it."""

    plan: Planned
    rollout: Rollout
    versions: list[int]


@dataclass
class AsyncState:
    """What a checkpoint keeps: the batches generated but not trained on, and the counters."""

    pushes: int
    next_index: int  # the next batch to plan
    batches: list[Generated]
    sampler: dict[str, int]  # the prompt sampler after the last planned batch
    dropped_total: int = 0

    @property
    def resume_sampler(self) -> dict[str, int]:
        """The sampler position of the first batch not trained on (where a synchronous run stands)."""
        return self.batches[0].plan.sampler_before if self.batches else self.sampler


@dataclass(frozen=True)
class Schedule:
    """Which generation batches may be generated after how many pushes.

    ``micro_per_generation`` and ``accumulation`` are the config's: a batch feeds that many
    micro-steps, an optimizer step takes ``accumulation`` of them, and a push happens at a
    batch boundary when an optimizer step happened since the last one.
    """

    lag: int  # K: pushes the generator may run behind the trainer
    micro_per_generation: int
    accumulation: int
    total: int  # generation batches in the whole run

    @classmethod
    def for_run(cls, lag: int, micro_per_generation: int, accumulation: int, total_steps: int) -> Schedule:
        """The schedule of a run of ``total_steps`` optimizer steps (``lag``: its ``max_staleness``)."""
        total = math.ceil(total_steps * accumulation / micro_per_generation)
        return cls(lag, micro_per_generation, accumulation, total)

    def push_before(self, index: int) -> int:
        """The push a synchronous run makes last before generating batch ``index`` (the first push is 1)."""
        if self.micro_per_generation >= self.accumulation:  # a push at every boundary
            return 1 + index
        return 1 + index * self.micro_per_generation // self.accumulation  # one per optimizer step

    def allowed(self, index: int, pushes: int) -> bool:
        """May batch ``index`` be generated once ``pushes`` pushes happened?"""
        return index < self.total and self.push_before(index) <= pushes + self.lag


@dataclass
class Taken:
    """What the trainer gets for one generation batch (broadcast to every process)."""

    rows: list[int]
    rollout: Rollout
    metrics: dict[str, float] = field(default_factory=dict)


class AsyncRollouts:
    """The main process's producer thread, its hand-out schedule and the staleness check.

    Args:
        generate: ``generate(planned)`` -> the batch from the server generator (called from the
            producer thread; the main thread only pushes while the producer is idle), single
            completions or, with ``--environment``, episodes.
        plan: ``plan(index)`` -> the prompts and sampling of batch ``index`` (main thread).
        schedule: which batches each push allows.
        max_staleness: completions more pushes old than this are dropped (``schedule.lag``
            normally equals it; a test makes it larger to see the drop work).
    """

    def __init__(self, generate: Callable[[Planned], Rollout], plan: Callable[[int], Planned], schedule: Schedule,
                 max_staleness: int) -> None:
        self.generate = generate
        self.plan = plan
        self.schedule = schedule
        self.max_staleness = max_staleness
        self.pushes = 0
        self.next_index = 0
        self.dropped_total = 0
        self._versions: dict[int, int] = {}  # server weight_version -> push number
        self._todo: list[Planned] = []
        self._done: dict[int, Generated] = {}
        self._outstanding = 0  # handed out, not finished
        self._error: BaseException | None = None
        self._closed = False
        self._busy_s = 0.0
        self._busy_since: float | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._produce, name="vroll-async-generation", daemon=True)

    def start_at(self, index: int) -> None:
        """A run that starts (or resumes without saved batches) at generation batch ``index``."""
        self.next_index = index
        self.pushes = self.schedule.push_before(index) - 1  # the pushes a synchronous run made before it

    # ------------------------------------------------------------------ main thread

    def pushed(self, server_version: int) -> None:
        """Record a push (the server now serves ``server_version``) and hand out what it allows."""
        with self._cond:
            self.pushes += 1
            self._versions[server_version] = self.pushes
        if self._thread.ident is None:  # started at the first push: a trainer never trained holds no thread
            self._thread.start()
        while self.schedule.allowed(self.next_index, self.pushes):
            planned = self.plan(self.next_index)
            self.next_index += 1
            with self._cond:
                self._todo.append(planned)
                self._outstanding += 1
                self._cond.notify_all()

    def wait_idle(self) -> float:
        """Block until every handed-out batch is generated; returns the seconds waited."""
        start = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._outstanding == 0 or self._error is not None)
            self._raise_error()
        return time.perf_counter() - start

    def take(self, index: int, clock: Clock) -> Taken:
        """Batch ``index`` (waiting for it if needed), stale completions replaced, with its metrics."""
        if index >= self.next_index:
            raise RuntimeError(f"async generation: batch {index} was never requested (planned up to "
                               f"{self.next_index - 1} after {self.pushes} pushes): a schedule bug")
        start = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: index in self._done or self._error is not None)
            self._raise_error()
            batch = self._done.pop(index)
            ready = len(self._done)
        clock.add("trainer_wait", time.perf_counter() - start)
        staleness = self._staleness(batch)
        dropped = 0
        if max(staleness) > self.max_staleness:
            dropped = len(staleness)
            batch, staleness = self._regenerate(batch, clock)
        self.dropped_total += dropped
        clock.add("generate", batch.rollout.seconds)
        metrics = {"async/staleness_mean": sum(staleness) / len(staleness), "async/staleness_max": max(staleness),
                   "async/dropped_samples": dropped, "async/dropped_samples_total": self.dropped_total,
                   "async/ready_batches": ready}
        return Taken(batch.plan.rows, batch.rollout, {k: float(v) for k, v in metrics.items()})

    def _staleness(self, batch: Generated) -> list[float]:
        """Pushes since the weights that sampled each completion (inf: weights this trainer never pushed)."""
        return [float(self.pushes - v) if v != UNKNOWN_VERSION else math.inf for v in batch.versions]

    def _regenerate(self, stale: Generated, clock: Clock) -> tuple[Generated, list[float]]:
        """Generate a dropped batch again, now, with the weights the server holds after the last push."""
        clock.add("trainer_wait", self.wait_idle())  # the generator is used from one thread at a time
        log.warning("async generation: batch %d was sampled %s pushes ago (max_staleness %d): dropped, "
                    "generating it again with the current weights", stale.plan.index,
                    max(self._staleness(stale)), self.max_staleness)
        start = time.perf_counter()
        fresh = self._generate(stale.plan)
        with self._cond:
            self._busy_s += time.perf_counter() - start
        clock.add("trainer_wait", time.perf_counter() - start)
        staleness = self._staleness(fresh)
        if max(staleness) > self.max_staleness:
            versions = sorted(set(fresh.rollout.weight_versions))
            raise RuntimeError(f"async generation: the server serves weight_version {versions}, which this trainer "
                               f"did not push last (a replica restarted with its initial weights, or another "
                               f"trainer pushed): restart the run, or resume it from its last checkpoint")
        return fresh, staleness

    def generator_busy_s(self) -> float:
        """Seconds the generator has spent on requests so far (including one in flight)."""
        with self._cond:
            running = time.perf_counter() - self._busy_since if self._busy_since is not None else 0.0
            return self._busy_s + running

    def state(self, sampler: dict[str, int]) -> AsyncState:
        """For a checkpoint: waits for the batches in flight, then snapshots (``sampler``: its position now)."""
        self.wait_idle()
        with self._cond:
            batches = [self._done[i] for i in sorted(self._done)]
        return AsyncState(self.pushes, self.next_index, batches, dict(sampler), self.dropped_total)

    def load(self, state: AsyncState) -> None:
        """Resume: the saved batches become ready again, counters as they were."""
        with self._cond:
            self.pushes, self.next_index, self.dropped_total = state.pushes, state.next_index, state.dropped_total
            self._done = {b.plan.index: b for b in state.batches}

    def close(self) -> None:
        """Stop the producer (a request in flight is left to finish on its own)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.ident is not None:
            self._thread.join(timeout=1.0)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ producer thread

    def _produce(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._todo or self._closed)
                if self._closed:
                    return
                planned = self._todo.pop(0)
                self._busy_since = time.perf_counter()
            try:
                batch = self._generate(planned)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                with self._cond:
                    self._error = exc
                    self._busy_since = None
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy_s += time.perf_counter() - self._busy_since
                self._busy_since = None
                self._done[planned.index] = batch
                self._outstanding -= 1
                self._cond.notify_all()

    def _generate(self, planned: Planned) -> Generated:
        rollout = self.generate(planned)
        with self._cond:
            versions = [self._versions.get(v, UNKNOWN_VERSION) for v in rollout.weight_versions]
        return Generated(planned, rollout, versions)
