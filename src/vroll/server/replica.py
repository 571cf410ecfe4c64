"""The body of one replica process: build the engine, then serve jobs in order.

A replica handles one job at a time, in the order the server queued them. That
order is the whole consistency story: a weight update queued between two generate
jobs is seen by neither half-way, so every response comes from one weight version.
"""

from __future__ import annotations

import logging
import os
import signal
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from vroll.protocol import (
    EngineSpec,
    GenerateJob,
    GenerateResult,
    JobDone,
    JobFailed,
    ReplicaReady,
    ReplicaStartFailed,
    Reply,
    ResetPrefixCacheJob,
    ShutdownJob,
    WeightsCloseJob,
    WeightsInitJob,
    WeightsReceiveJob,
)

if TYPE_CHECKING:  # vLLM is imported in the replica process only, never by the server
    from vroll.engine.vllm_adapter import VLLMEngine

log = logging.getLogger("vroll.replica")


class Replica:
    """One engine plus the state the server reads back: weight version, health."""

    def __init__(self, engine: VLLMEngine) -> None:
        self.engine = engine
        self.weight_version = 0
        self.broken: str | None = None  # set when a streamed sync left weights half-loaded

    def handle(self, job: object) -> Reply:
        """Run one job and say how it went (never raises)."""
        try:
            return self._dispatch(job)
        except ValueError as exc:  # vLLM's input validation (VLLMValidationError is one)
            return JobFailed(400, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug or an engine error: report it, keep serving
            log.error("job %s failed:\n%s", type(job).__name__, traceback.format_exc())
            return JobFailed(500, f"{type(exc).__name__}: {exc}")

    def _dispatch(self, job: object) -> Reply:
        if isinstance(job, GenerateJob):
            if self.broken:
                return JobFailed(503, self.broken, fatal=True)
            return GenerateResult(self.engine.generate(job), self.weight_version)
        if isinstance(job, ResetPrefixCacheJob):
            self.engine.reset_prefix_cache()
            return JobDone(self.weight_version)
        if isinstance(job, WeightsInitJob):
            return self._init_weights(job)
        if isinstance(job, WeightsReceiveJob):
            return self._receive_weights(job)
        if isinstance(job, WeightsCloseJob):
            self.engine.rpc("vroll_close_group")
            return JobDone(self.weight_version)
        return JobFailed(500, f"unknown job {type(job).__name__}")

    def _init_weights(self, job: WeightsInitJob) -> Reply:
        ranks = self.engine.rpc(
            "vroll_init_group", job.host, job.port, job.world_size, job.rank_offset,
            job.backend, job.timeout_s, job.session_id,
        )
        return JobDone(self.weight_version, detail=f"ranks {ranks}")

    def _receive_weights(self, job: WeightsReceiveJob) -> Reply:
        results = self.engine.rpc("vroll_receive_weights", job.buckets, job.atomic)
        failures = [msg for ok, _, msg in results if not ok]
        if failures:
            if not all(intact for _, intact, _ in results):
                self.broken = f"weights half-updated by failed sync {job.update_id}: {failures[0]}"
                return JobFailed(503, self.broken, fatal=True)
            return JobFailed(409, failures[0])
        self.engine.reset_prefix_cache()
        self.weight_version += 1
        self.broken = None
        return JobDone(self.weight_version)


def _exit_with_parent() -> None:
    """Linux: get SIGTERM when the server dies, even by SIGKILL, so no replica holds GPUs."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the closed pipe still ends the job loop


def replica_main(index: int, spec: EngineSpec, env: dict[str, str], conn: Connection) -> None:
    """Process entry point (spawned): set the device slice, build the engine, loop."""
    _exit_with_parent()
    os.environ.update(env)
    # The parent owns Ctrl-C: it tells replicas to stop, so they never die mid-job on SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=env.get("VROLL_LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s replica {index} %(levelname)s %(message)s")
    try:
        from vroll.engine.vllm_adapter import VLLMEngine

        engine = VLLMEngine(spec)
        replica = Replica(engine)
        conn.send(ReplicaReady(engine.info()))
    except BaseException as exc:  # noqa: BLE001 - any start failure must reach the parent
        log.error("replica %d failed to start:\n%s", index, traceback.format_exc())
        conn.send(ReplicaStartFailed(f"{type(exc).__name__}: {exc}"))
        return
    _serve(replica, conn)


def _serve(replica: Replica, conn: Connection) -> None:
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the server is gone: nothing left to serve
            return
        if isinstance(job, ShutdownJob):
            return
        conn.send(replica.handle(job))
