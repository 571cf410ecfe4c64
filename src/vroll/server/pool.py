"""Replica processes: where they run, how jobs reach them, how they stop.

Each replica is a spawned process with its own device slice (replica ``r`` gets
``CUDA_VISIBLE_DEVICES`` entries ``r*T .. r*T+T-1``; on CPU the cores are split
among the ``D*T`` workers). The server talks to a replica through one pipe, driven
by one thread that sends a job and waits for its reply, so jobs reach each replica
in the order they were submitted. ``submit_all`` enqueues on every replica without
yielding in between, which gives all replicas the same order of multi-replica jobs.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection

from vroll.protocol import (
    EngineInfo,
    EngineSpec,
    Job,
    ReplicaReady,
    ReplicaStartFailed,
    ReplicaStatus,
    ShutdownJob,
)
from vroll.server.replica import replica_main

log = logging.getLogger("vroll.server")


class ReplicaDied(RuntimeError):
    """A replica process exited; its jobs cannot complete."""


@dataclass(frozen=True)
class DeviceSlice:
    """The environment that pins one replica to its devices."""

    env: dict[str, str]
    description: str


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no CUDA build, no driver: a CPU machine
        return []


def _cpu_groups(workers: int) -> list[list[int]]:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise ValueError(
            f"{workers} vLLM workers (data x tensor parallel) need at least {workers} CPU cores, "
            f"found {len(cores)}"
        )
    per = len(cores) // workers
    return [cores[i * per : (i + 1) * per] for i in range(workers)]


def device_slices(dp: int, tp: int) -> list[DeviceSlice]:
    """One environment per replica: its GPUs, or its CPU cores when there is no GPU."""
    gpus = _visible_gpus()
    if gpus:
        if len(gpus) < dp * tp:
            raise ValueError(
                f"--data-parallel-size {dp} x --tensor-parallel-size {tp} needs {dp * tp} GPUs, "
                f"but {len(gpus)} are visible (CUDA_VISIBLE_DEVICES={','.join(gpus)})"
            )
        out = []
        for r in range(dp):
            mine = ",".join(gpus[r * tp : (r + 1) * tp])
            out.append(DeviceSlice({"CUDA_VISIBLE_DEVICES": mine}, f"GPUs {mine}"))
        return out
    groups = _cpu_groups(dp * tp)
    out = []
    for r in range(dp):
        mine = groups[r * tp : (r + 1) * tp]
        bind = "|".join(",".join(map(str, g)) for g in mine)
        env = {"VLLM_CPU_OMP_THREADS_BIND": bind, "CUDA_VISIBLE_DEVICES": ""}
        out.append(DeviceSlice(env, f"CPU cores {bind}"))
    return out


@dataclass
class _Pending:
    job: Job
    future: Future


class ReplicaHandle:
    """The server's end of one replica: a job queue drained by one thread."""

    def __init__(self, index: int, process: mp.process.BaseProcess, conn: Connection) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.status = ReplicaStatus(index)
        self.ready = threading.Event()
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"replica-{index}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        """Queue a job; the future resolves to its reply or raises ``ReplicaDied``."""
        fut: Future = Future()
        if self.status.state == "dead":
            fut.set_exception(ReplicaDied(self._death_reason()))
        else:
            self._queue.put(_Pending(job, fut))
        return fut

    def _death_reason(self) -> str:
        return f"replica {self.index} is down: {self.status.reason or 'process exited'}"

    def _recv(self) -> object:
        while not self.conn.poll(0.2):
            if not self.process.is_alive():
                raise ReplicaDied(f"process exited with code {self.process.exitcode}")
        return self.conn.recv()

    def _run(self) -> None:
        try:
            self._await_ready()
            while True:
                item = self._next()
                self.conn.send(item.job)
                if isinstance(item.job, ShutdownJob):
                    return
                reply = self._recv()
                item.future.set_result(reply)
        except (ReplicaDied, EOFError, OSError) as exc:
            self._mark_dead(str(exc) or type(exc).__name__)

    def _await_ready(self) -> None:
        msg = self._recv()
        if isinstance(msg, ReplicaStartFailed):
            raise ReplicaDied(f"engine failed to start: {msg.message}")
        assert isinstance(msg, ReplicaReady)
        self.status.info = msg.info
        self.status.state = "ready"
        self.ready.set()

    def _next(self) -> _Pending:
        while True:
            try:
                return self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self.process.is_alive():
                    raise ReplicaDied(f"process exited with code {self.process.exitcode}") from None

    def _mark_dead(self, reason: str) -> None:
        if self.status.state != "dead":
            log.error("replica %d is down: %s", self.index, reason)
        self.status.state = "dead"
        self.status.reason = reason
        self.ready.set()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if not item.future.done():
                item.future.set_exception(ReplicaDied(self._death_reason()))


class ReplicaPool:
    """D replica processes, started together and stopped together."""

    def __init__(self, spec: EngineSpec, dp: int, log_level: str = "info") -> None:
        self.spec = spec
        self.slices = device_slices(dp, spec.tensor_parallel_size)
        self.log_level = log_level
        self.replicas: list[ReplicaHandle] = []

    def start(self) -> None:
        """Spawn every replica (returns at once; see :meth:`wait_ready`)."""
        ctx = mp.get_context("spawn")  # vLLM and CUDA need a fresh interpreter
        for index, sl in enumerate(self.slices):
            parent, child = ctx.Pipe()
            env = {**sl.env, "VROLL_LOG_LEVEL": self.log_level.upper()}
            proc = ctx.Process(target=replica_main, args=(index, self.spec, env, child),
                               name=f"vroll-replica-{index}", daemon=False)
            proc.start()
            child.close()
            log.info("replica %d: pid %d on %s", index, proc.pid, sl.description)
            self.replicas.append(ReplicaHandle(index, proc, parent))

    def wait_ready(self, timeout_s: float) -> list[EngineInfo]:
        """Block until every replica is up; raise with the first failure's reason."""
        deadline = time.monotonic() + timeout_s
        for r in self.replicas:
            if not r.ready.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"replica {r.index} not ready after {timeout_s:.0f} s")
            if r.status.state == "dead":
                raise RuntimeError(f"replica {r.index} failed to start: {r.status.reason}")
        return [r.status.info for r in self.replicas if r.status.info is not None]

    @property
    def healthy(self) -> bool:
        return bool(self.replicas) and all(r.status.state == "ready" for r in self.replicas)

    def submit_all(self, jobs: list[Job]) -> list[Future]:
        """Queue ``jobs[i]`` on replica ``i``, with no other job slipping in between."""
        return [r.submit(job) for r, job in zip(self.replicas, jobs, strict=True)]

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Ask replicas to exit, then terminate and kill what is left: no orphans."""
        for r in self.replicas:
            r.submit(ShutdownJob())  # queued behind running jobs; the kill below bounds the wait
        deadline = time.monotonic() + grace_s
        for r in self.replicas:
            r.process.join(max(0.0, deadline - time.monotonic()))
        for sig in ("terminate", "kill"):
            for r in self.replicas:
                if r.process.is_alive():
                    getattr(r.process, sig)()
                    r.process.join(3)
