"""Replica processes: where they run, how jobs reach them, how they stop.

Each replica is a spawned process with its own device slice (replica ``r`` gets
``CUDA_VISIBLE_DEVICES`` entries ``r*T .. r*T+T-1``; on CPU the cores are split
among the ``D*T`` workers, and each replica is pinned to its own). The server talks to
a replica through one pipe: jobs are sent in the order they are submitted, tagged with
an id, and answers come back by id (generates run concurrently in the replica, see
:mod:`vroll.server.replica` for the ordering). ``submit_all`` sends to every replica
without yielding in between, which gives all replicas the same order of multi-replica jobs.

Health: a watchdog pings every replica each second. A replica whose process exited,
that answers no ping for ``heartbeat_timeout_s``, or whose generates made no token for
``stall_timeout_s`` cannot serve: its waiting jobs fail with the reason (HTTP 503), its
process group is killed and a fresh one is started. The server keeps no copy of synced
weights (they stream from the trainer straight to the workers), so a restarted replica
serves the base checkpoint, weight version 0, and says so in its status until the
trainer syncs again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal

from vroll.engine.config import EngineSpec
from vroll.protocol import (
    EngineInfo,
    Job,
    ReplicaReady,
    ReplicaStartFailed,
    ShutdownJob,
)
from vroll.server.replica import Answer, Cancel, Envelope, Ping, Pong, replica_main

log = logging.getLogger("vroll.server")



@dataclass
class ReplicaStatus:
    """Server-side view of one replica, for /health."""

    index: int
    state: Literal["starting", "ready", "restarting", "dead"] = "starting"
    reason: str = ""
    info: EngineInfo | None = None

class ReplicaDied(RuntimeError):
    """A replica cannot answer (exited, stuck, restarting, server stopping); its jobs fail."""


@dataclass(frozen=True)
class Watchdog:
    """Bounds after which a replica counts as stuck (seconds)."""

    heartbeat_timeout_s: float = 30.0  # no answer to a ping: the replica's event loop is blocked
    stall_timeout_s: float = 120.0  # generates in flight but no token from the engine
    max_restarts: int = 5  # then the replica stays dead (a crash loop would hide the cause)


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


Spawn = Callable[[], tuple[mp.process.BaseProcess, Connection]]


class ReplicaHandle:
    """The server's end of one replica: sends jobs, routes answers, watches health, restarts."""

    def __init__(self, index: int, spawn: Spawn, watchdog: Watchdog) -> None:
        self.index = index
        self.status = ReplicaStatus(index)
        self.ready = threading.Event()
        self.on_restart: list[Callable[[int], None]] = []  # called with the index once restarted
        self.restarts = 0
        self._spawn = spawn
        self._watchdog = watchdog
        self._lock = threading.Lock()  # one sender at a time; guards _pending and the state
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count()
        self._stopping: str | None = None
        self._handled: object = None  # the last process _fail dealt with
        self._last_pong = time.monotonic()
        self._stalled_s = 0.0
        self._start()
        threading.Thread(target=self._watch, name=f"replica-{index}-watchdog", daemon=True).start()

    def _start(self) -> None:
        self.process, self.conn = self._spawn()
        self._last_pong = time.monotonic()
        self._stalled_s = 0.0
        threading.Thread(target=self._receive, args=(self.process, self.conn),
                         name=f"replica-{self.index}", daemon=True).start()

    # ---------------------------------------------------------------- jobs

    def submit(self, job: Job) -> Future:
        """Send a job; the future resolves to its reply or raises ``ReplicaDied``."""
        fut: Future = Future()
        with self._lock:
            if self.status.state != "ready" and not isinstance(job, ShutdownJob):
                fut.set_exception(ReplicaDied(self._unavailable()))
                return fut
            job_id = next(self._ids)
            self._pending[job_id] = fut
            try:
                self.conn.send(Envelope(job_id, job))
            except (OSError, ValueError) as exc:
                self._pending.pop(job_id, None)
                fut.set_exception(ReplicaDied(f"replica {self.index} is down: {exc}"))
        return fut

    def cancel(self, fut: Future) -> None:
        """The caller no longer wants ``fut``: abort its work in the replica (generates only)."""
        with self._lock:
            job_id = next((i for i, f in self._pending.items() if f is fut), None)
            if job_id is not None:
                try:
                    self.conn.send(Cancel(job_id))
                except (OSError, ValueError):
                    pass

    def _unavailable(self) -> str:
        if self._stopping:
            return self._stopping
        state = self.status.state
        return f"replica {self.index} is {'down' if state == 'dead' else state}: {self.status.reason}"

    # ------------------------------------------------------------- receiving

    def _receive(self, process: mp.process.BaseProcess, conn: Connection) -> None:
        """One process's answers, until it exits (then the watchdog's restart takes over)."""
        try:
            first = self._recv(process, conn)
            if isinstance(first, ReplicaStartFailed):
                self._fail(process, f"engine failed to start: {first.message}", restart=False)
                return
            assert isinstance(first, ReplicaReady)
            self._became_ready(first)
            while True:
                msg = self._recv(process, conn)
                if isinstance(msg, Pong):
                    self._last_pong, self._stalled_s = time.monotonic(), msg.stalled_s
                elif isinstance(msg, Answer):
                    with self._lock:
                        fut = self._pending.pop(msg.job_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.reply)
        except (ReplicaDied, EOFError, OSError) as exc:
            process.join(1.0)  # a closed pipe usually means the process just died: name how
            reason = exit_reason(process) if process.exitcode is not None else (str(exc) or type(exc).__name__)
            self._fail(process, reason)

    @staticmethod
    def _recv(process: mp.process.BaseProcess, conn: Connection) -> object:
        while not conn.poll(0.2):
            if not process.is_alive():
                raise ReplicaDied(exit_reason(process))
        return conn.recv()

    def _became_ready(self, msg: ReplicaReady) -> None:
        with self._lock:
            self.status.info = msg.info
            self.status.state = "ready"
            if self.restarts:
                self.status.reason = (f"restarted {self.restarts}x (last after: {self.status.reason}); "
                                      "serves the base weights (version 0) until the trainer syncs again")
            self._last_pong = time.monotonic()
        self.ready.set()
        if self.restarts:
            log.warning("replica %d is back (restart %d), serving the base weights", self.index, self.restarts)
            for hook in self.on_restart:
                hook(self.index)

    # ---------------------------------------------------------- health, restart

    def _watch(self) -> None:
        while self._stopping is None:
            time.sleep(1.0)
            if self.status.state != "ready":
                continue
            process, silent = self.process, time.monotonic() - self._last_pong
            if silent > self._watchdog.heartbeat_timeout_s:
                self._fail(process, f"stuck: no heartbeat for {silent:.0f} s")
            elif self._stalled_s > self._watchdog.stall_timeout_s:
                self._fail(process, f"stuck: generation made no progress for {self._stalled_s:.0f} s")
            else:
                try:
                    with self._lock:
                        self.conn.send(Ping())
                except (OSError, ValueError):
                    pass  # the receiver sees the exit

    def _fail(self, process: mp.process.BaseProcess, reason: str, restart: bool = True) -> None:
        """Fail ``process``'s waiting jobs with ``reason``, kill it, and start a fresh one."""
        with self._lock:
            if process is not self.process or process is self._handled:
                return  # an old process, or already handled
            self._handled = process
            ever_ready = self.status.info is not None
            again = (restart and ever_ready and self._stopping is None
                     and self.restarts < self._watchdog.max_restarts)
            self.status.state = "restarting" if again else "dead"
            self.status.reason = reason
            pending, self._pending = self._pending, {}
        if self._stopping is None:
            log.error("replica %d cannot serve: %s%s", self.index, reason, "; restarting" if again else "")
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ReplicaDied(self._stopping or f"replica {self.index} failed: {reason}"))
        kill_group(process)
        if again:
            self.restarts += 1
            self._start()
        else:
            self.ready.set()

    def fail_waiting(self, reason: str) -> None:
        """Server shutdown: refuse new jobs and answer waiting ones with ``reason`` now."""
        with self._lock:
            self._stopping = reason
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ReplicaDied(reason))


def exit_reason(process: mp.process.BaseProcess) -> str:
    """``process exited with code 1`` or ``process killed by SIGKILL``."""
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"process killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"process exited with code {code}"


def kill_group(process: mp.process.BaseProcess) -> None:
    """SIGKILL a replica and everything in its process group (its vLLM engine core)."""
    if process.pid is None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # not (yet) leading its own group
        if process.is_alive():
            process.kill()
    process.join(5)


class ReplicaPool:
    """D replica processes, started together, restarted one by one, stopped together."""

    def __init__(self, spec: EngineSpec, dp: int, log_level: str = "info",
                 watchdog: Watchdog | None = None) -> None:
        self.spec = spec
        self.slices = device_slices(dp, spec.config.tensor_parallel_size)
        self.log_level = log_level
        self.watchdog = watchdog or Watchdog()
        self.replicas: list[ReplicaHandle] = []
        self.on_restart: list[Callable[[int], None]] = []  # shared by every replica's handle

    def start(self) -> None:
        """Spawn every replica (returns at once; see :meth:`wait_ready`)."""
        for index in range(len(self.slices)):
            handle = ReplicaHandle(index, lambda i=index: self._spawn(i), self.watchdog)
            handle.on_restart = self.on_restart
            self.replicas.append(handle)

    def _spawn(self, index: int) -> tuple[mp.process.BaseProcess, Connection]:
        ctx = mp.get_context("spawn")  # vLLM and CUDA need a fresh interpreter
        sl = self.slices[index]
        parent, child = ctx.Pipe()
        env = {**sl.env, "VROLL_LOG_LEVEL": self.log_level.upper()}
        proc = ctx.Process(target=replica_main, args=(index, self.spec, env, child),
                           name=f"vroll-replica-{index}", daemon=False)
        proc.start()
        child.close()
        log.info("replica %d: pid %d on %s", index, proc.pid, sl.description)
        return proc, parent

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

    def unhealthy_reason(self) -> str | None:
        """Why the pool cannot serve now (the first replica that is not ready), or None."""
        for r in self.replicas:
            if r.status.state != "ready":
                return r._unavailable() if r.status.reason else f"replica {r.index} is {r.status.state}"
        return None if self.replicas else "no replicas"

    def submit_all(self, jobs: list[Job]) -> list[Future]:
        """Send ``jobs[i]`` to replica ``i``, with no other job slipping in between."""
        return [r.submit(job) for r, job in zip(self.replicas, jobs, strict=True)]

    def cancel(self, futures: list[Future]) -> None:
        """Abort the generates behind ``futures`` (their client went away)."""
        for r in self.replicas:
            for fut in futures:
                r.cancel(fut)

    async def gather(self, futures: list[Future], disconnected: Callable[[], Awaitable[bool]],
                     poll_s: float = 0.5) -> list[object]:
        """Await every reply; if ``disconnected()`` turns true (or we are cancelled), abort the jobs."""
        waiter = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=poll_s)
                if done:
                    return list(waiter.result())
                if await disconnected():
                    raise ClientGone("the client went away; its generation was aborted")
        except (asyncio.CancelledError, ClientGone):
            self.cancel(futures)
            waiter.cancel()
            raise

    def fail_waiting(self, reason: str) -> None:
        """Answer every waiting job with ``reason`` and refuse new ones (server shutting down)."""
        for r in self.replicas:
            r.fail_waiting(reason)

    def shutdown(self, grace_s: float = 1.5) -> None:
        """Ask replicas to exit, then kill what is left with its engine core: no orphans."""
        self.fail_waiting("the server is shutting down")
        for r in self.replicas:
            r.submit(ShutdownJob())
        deadline = time.monotonic() + grace_s
        for r in self.replicas:
            r.process.join(max(0.0, deadline - time.monotonic()))
        for r in self.replicas:
            kill_group(r.process)


class ClientGone(Exception):
    """The HTTP client disconnected while waiting for its generation."""
