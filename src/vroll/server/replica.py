"""The body of one replica process: build the engine, then serve jobs through one engine loop.

Generate jobs run concurrently on vLLM's async engine, so its scheduler batches the
requests of all clients; a generate whose client went away is cancelled (``Cancel``)
and its requests are aborted in the engine. Every other job (weight init/receive/close,
prefix-cache reset) is a barrier, and this is the consistency story:

1. jobs are taken from the pipe in the order the server sent them;
2. a barrier job first waits until every generate started before it has finished
   (drain, not abort: those requests keep the weights they started with);
3. while it runs, no later job starts, so generates sent after it see its result.

So no response ever mixes two weight versions, and a weight load never runs beside a
generate step. Pings and cancels bypass the queue so the server can tell a replica
that is busy (loading weights, generating) from one that is stuck or dead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from vroll.engine.config import EngineSpec
from vroll.protocol import (
    GenerateJob,
    GenerateResult,
    Job,
    JobDone,
    JobFailed,
    ReceiveResult,
    ReplicaReady,
    ReplicaStartFailed,
    Reply,
    ResetPrefixCacheJob,
    ShutdownJob,
    TransferCommitJob,
    TransferDropJob,
    TransferInitJob,
    TransferReceiveJob,
    WeightsCloseJob,
    WeightsInitJob,
    WeightsReceiveJob,
)

if TYPE_CHECKING:  # vLLM is imported in the replica process only, never by the server
    from vroll.engine.vllm_adapter import AsyncVLLMEngine

log = logging.getLogger("vroll.replica")

# HTTP-style status of a generate whose client went away (nobody reads it).
CANCELLED_STATUS = 499


# ------------------------------------------------------------ the pipe's messages


@dataclass(frozen=True)
class Envelope:
    """Server -> replica: a job and the id its answer will carry."""

    job_id: int
    job: Job


@dataclass(frozen=True)
class Answer:
    """Replica -> server: the reply to job ``job_id`` (answers may come out of order)."""

    job_id: int
    reply: Reply


@dataclass(frozen=True)
class Cancel:
    """Server -> replica: the client of generate job ``job_id`` went away; abort it."""

    job_id: int


@dataclass(frozen=True)
class Ping:
    """Server -> replica: are you alive? Answered by the event loop, outside the job order."""


@dataclass(frozen=True)
class Pong:
    """Replica -> server: alive, with ``generating`` jobs in flight that made no token for ``stalled_s``."""

    generating: int
    stalled_s: float


# ------------------------------------------------------------------- the replica


class Replica:
    """One engine plus the state the server reads back: weight version, health."""

    def __init__(self, engine: AsyncVLLMEngine) -> None:
        self.engine = engine
        self.weight_version = 0
        self.broken: str | None = None  # set when a streamed sync left weights half-loaded

    async def handle(self, job: object, tag: str = "") -> Reply:
        """Run one job and say how it went (never raises, except when cancelled)."""
        from vroll.engine.vllm_adapter import EngineDead

        try:
            return await self._dispatch(job, tag)
        except ValueError as exc:  # vLLM's input validation
            return JobFailed(400, f"{type(exc).__name__}: {exc}")
        except EngineDead as exc:
            # Nothing here can serve again: exit (with the engine core) so the server restarts us.
            asyncio.get_running_loop().call_later(0.5, _kill_my_group, signal.SIGTERM, None)
            return JobFailed(503, f"engine died: {exc}", fatal=True)
        except Exception as exc:  # a bug or an engine error: report it, keep serving
            log.error("job %s failed:\n%s", type(job).__name__, traceback.format_exc())
            return JobFailed(500, f"{type(exc).__name__}: {exc}")

    async def _dispatch(self, job: object, tag: str) -> Reply:
        if isinstance(job, GenerateJob):
            if self.broken:
                return JobFailed(503, self.broken, fatal=True)
            return GenerateResult(await self.engine.generate(job, tag), self.weight_version)
        if isinstance(job, ResetPrefixCacheJob):
            await self.engine.reset_prefix_cache()
            return JobDone(self.weight_version)
        if isinstance(job, WeightsInitJob):
            return await self._init_weights(job)
        if isinstance(job, WeightsReceiveJob):
            return await self._receive_weights(job)
        if isinstance(job, WeightsCloseJob):
            await self.engine.rpc("vroll_close_group")
            return JobDone(self.weight_version)
        return await self._dispatch_native(job)

    async def _dispatch_native(self, job: object) -> Reply:
        """vLLM's weight-transfer protocol (TRL's client): receive into staging, load at commit."""
        if isinstance(job, TransferInitJob):
            try:
                ranks = await self.engine.rpc("vroll_native_init", job.host, job.port, job.world_size,
                                              job.rank_offset, job.timeout_s)
            except Exception as exc:  # the trainer went away before every rank joined (bounded wait)
                await self.engine.rpc("vroll_native_close")
                return JobFailed(409, f"{type(exc).__name__}: {exc}")
            return JobDone(self.weight_version, detail=f"ranks {ranks}")
        if isinstance(job, TransferReceiveJob):
            metas = job.tensors
            replies = await self.engine.rpc("vroll_native_receive", [m.name for m in metas],
                                            [m.dtype for m in metas], [list(m.shape) for m in metas],
                                            job.packed, job.buffer_bytes, job.discard)
            failed = [r.message for r in map(ReceiveResult.from_rpc, replies) if not r.ok]
            if failed:
                await self.engine.rpc("vroll_native_drop")
                return JobFailed(409, failed[0])
            return JobDone(self.weight_version)
        if isinstance(job, TransferCommitJob):
            return await self._commit_native()
        if isinstance(job, TransferDropJob):
            await self.engine.rpc("vroll_native_drop")
            return JobDone(self.weight_version)
        return JobFailed(500, f"unknown job {type(job).__name__}")

    async def _commit_native(self) -> Reply:
        results = [ReceiveResult.from_rpc(r) for r in await self.engine.rpc("vroll_native_commit")]
        failures = [r.message for r in results if not r.ok]
        if failures:
            self.broken = f"weights half-updated by a failed /finish_weight_update: {failures[0]}"
            return JobFailed(503, self.broken, fatal=True)
        await self.engine.reset_prefix_cache()
        self.weight_version += 1
        self.broken = None
        return JobDone(self.weight_version)

    async def _init_weights(self, job: WeightsInitJob) -> Reply:
        try:
            ranks = await self.engine.rpc(
                "vroll_init_group", job.host, job.port, job.world_size, job.rank_offset,
                job.backend, job.timeout_s, job.session_id,
            )
        except Exception as exc:  # the trainer went away before every rank joined (bounded wait)
            await self.engine.rpc("vroll_close_group")
            return JobFailed(409, f"{type(exc).__name__}: {exc}")
        return JobDone(self.weight_version, detail=f"ranks {ranks}")

    async def _receive_weights(self, job: WeightsReceiveJob) -> Reply:
        replies = await self.engine.rpc("vroll_receive_weights", job.buckets, job.atomic, job.lora, job.update_id)
        results = [ReceiveResult.from_rpc(r) for r in replies]
        failures = [r.message for r in results if not r.ok]
        if failures:
            if not all(r.intact for r in results):
                self.broken = f"weights half-updated by failed sync {job.update_id}: {failures[0]}"
                return JobFailed(503, self.broken, fatal=True)
            return JobFailed(409, failures[0])
        if job.lora is not None:
            self.engine.lora.serve(job.update_id)  # every later request carries the new adapter version
        await self.engine.reset_prefix_cache()
        self.weight_version += 1
        self.broken = None
        return JobDone(self.weight_version)


class _JobLoop:
    """The replica's event loop side: ordered jobs, concurrent generates, pings, cancels."""

    def __init__(self, replica: Replica, conn: Connection) -> None:
        self.replica = replica
        self.conn = conn
        self.jobs: asyncio.Queue[Envelope | None] = asyncio.Queue()
        self.generating: dict[int, asyncio.Task] = {}
        self.busy_since = time.monotonic()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reader thread: the pipe's messages, handed to the loop as they come."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):  # the server is gone: nothing left to serve
                msg = None
            loop.call_soon_threadsafe(self._arrive, msg)
            if msg is None or (isinstance(msg, Envelope) and isinstance(msg.job, ShutdownJob)):
                return

    def _arrive(self, msg: object) -> None:
        if isinstance(msg, Ping):
            progress = max(self.replica.engine.last_progress, self.busy_since)
            stalled = time.monotonic() - progress if self.generating else 0.0
            self._send(Pong(len(self.generating), stalled))
        elif isinstance(msg, Cancel):
            task = self.generating.get(msg.job_id)
            if task is not None:
                task.cancel()
        else:
            self.jobs.put_nowait(msg)  # type: ignore[arg-type]

    def _send(self, msg: object) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError):  # the server is gone; the reader ends the loop
            pass

    async def run(self) -> None:
        threading.Thread(target=self._read, args=(asyncio.get_running_loop(),), daemon=True).start()
        while True:
            msg = await self.jobs.get()
            if msg is None or isinstance(msg.job, ShutdownJob):
                for task in self.generating.values():
                    task.cancel()
                return
            if isinstance(msg.job, GenerateJob):
                if not self.generating:
                    self.busy_since = time.monotonic()
                task = asyncio.create_task(self.replica.handle(msg.job, f"job{msg.job_id}"))
                self.generating[msg.job_id] = task
                task.add_done_callback(partial(self._generated, msg.job_id))
                continue
            if self.generating:  # barrier: drain the generates sent before this job
                await asyncio.wait(list(self.generating.values()))
            self._send(Answer(msg.job_id, await self.replica.handle(msg.job)))

    def _generated(self, job_id: int, task: asyncio.Task) -> None:
        self.generating.pop(job_id, None)
        if task.cancelled():
            reply: Reply = JobFailed(CANCELLED_STATUS, "cancelled: the client went away")
        else:
            reply = task.result()
        self._send(Answer(job_id, reply))


# ------------------------------------------------------------------- the process


def _exit_with_parent() -> None:
    """Linux: get SIGTERM when the server dies, even by SIGKILL, so no replica holds devices."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the closed pipe still ends the job loop


def _kill_my_group(signum: int, frame: object) -> None:
    """SIGTERM: take the engine core process (our child, in our process group) down with us."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _pin_cpus(env: dict[str, str]) -> None:
    """CPU: keep this process, its engine core and their threads on this replica's cores.

    ``VLLM_CPU_OMP_THREADS_BIND`` only places vLLM's OpenMP threads; without this the
    frontend, tokenizer and torch's intra-op pools of every replica spread over all
    cores, and two replicas on two cores fight for both.
    """
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND")
    if not bind:
        return
    cores = {int(c) for group in bind.split("|") for c in group.split(",") if c.strip()}
    os.sched_setaffinity(0, cores)
    os.environ.setdefault("OMP_NUM_THREADS", str(len(cores)))


def replica_main(index: int, spec: EngineSpec, env: dict[str, str], conn: Connection) -> None:
    """Process entry point (spawned): set the device slice, build the engine, loop."""
    _exit_with_parent()
    # Our own process group, so the server can kill this replica with its engine core.
    os.setpgrp()
    signal.signal(signal.SIGTERM, _kill_my_group)
    os.environ.update(env)
    _pin_cpus(env)
    # The parent owns Ctrl-C: it tells replicas to stop, so they never die mid-job on SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=env.get("VROLL_LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s replica {index} %(levelname)s %(message)s")
    asyncio.run(_main(index, spec, conn))


async def _main(index: int, spec: EngineSpec, conn: Connection) -> None:
    try:
        from vroll.engine.vllm_adapter import AsyncVLLMEngine

        engine = AsyncVLLMEngine.create(spec)
        conn.send(ReplicaReady(engine.info()))
    except BaseException as exc:  # noqa: BLE001 - any start failure must reach the parent
        log.error("replica %d failed to start:\n%s", index, traceback.format_exc())
        conn.send(ReplicaStartFailed(f"{type(exc).__name__}: {exc}"))
        return
    try:
        await _JobLoop(Replica(engine), conn).run()
    finally:
        engine.shutdown()
