"""The server's side of weight sync: trainer sessions, manifest checks, update tracking.

Order of one sync, as the server sees it (the trainer's side is in
``vroll.weightsync.sender``; the workers' in ``vroll.engine.worker_extension``):

1. ``/weights/init``: a trainer session is opened and every replica is told to join
   the trainer's group (rank ``1 + r*T + t``). A session whose trainer no longer
   answers on its store port is stale and is replaced; a live one is kept (409).
2. ``/weights/update``: the manifest is checked against the checkpoint's names,
   shapes and the serving dtype *before* any byte moves, then one receive job is
   queued on every replica behind the jobs already queued there.
3. ``GET /weights/update/{id}``: waits for every replica and reports the new version.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

from vroll.protocol import (
    JobDone,
    JobFailed,
    WeightsCloseJob,
    WeightsInitJob,
    WeightsInitRequest,
    WeightsReceiveJob,
    WeightsUpdateRequest,
)
from vroll.weightsync.buckets import TensorMeta, to_dtype


class WeightSyncError(Exception):
    """A weight-sync request the server refuses; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    session_id: str
    host: str
    port: int
    backend: str
    joins: list[Future]


@dataclass
class Update:
    update_id: int
    futures: list[Future]
    error: str | None = None
    weight_version: int | None = None


def _layer_key(name: str) -> tuple[str, int] | None:
    """``model.layers.3.mlp.up_proj.weight`` -> ``("model.layers", 3)``; None if unindexed."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return None


def trainer_alive(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a trainer still listens on its rendezvous store port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass
class WeightSessions:
    """At most one trainer session, and the updates it has made."""

    dp: int
    tp: int
    dtype: str
    device: str
    checkpoint: dict[str, tuple[str, tuple[int, ...]]] | None
    session: Session | None = None
    updates: dict[int, Update] = field(default_factory=dict)
    replica_versions: list[int] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.replica_versions = [0] * self.dp

    @property
    def weight_version(self) -> int:
        """The version every replica serves (the lowest, if one lags after a failure)."""
        return min(self.replica_versions, default=0)

    def _track(self, replica: int, fut: Future) -> None:
        def record(done: Future) -> None:
            reply = None if done.exception() else done.result()
            if isinstance(reply, JobDone):
                self.replica_versions[replica] = reply.weight_version

        fut.add_done_callback(record)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp + 1

    def open(self, req: WeightsInitRequest, submit_all) -> Session:  # noqa: ANN001
        """Start a session, replacing a stale one; refuses a second live trainer."""
        if req.backend == "nccl" and self.device == "cpu":
            raise WeightSyncError(400, "backend 'nccl' needs GPUs but this server runs on CPU: use 'gloo'")
        old = self.session
        if old is not None and not req.force and trainer_alive(old.host, old.port):
            raise WeightSyncError(
                409, f"another trainer (session {old.session_id}, store {old.host}:{old.port}) is "
                     "connected; stop it first, or pass force=true to take over")
        if old is not None:
            submit_all([WeightsCloseJob()] * self.dp)
        sid = uuid.uuid4().hex[:12]
        jobs = [WeightsInitJob(req.host, req.port, req.backend, self.world_size, 1 + r * self.tp,
                               req.timeout_s, sid) for r in range(self.dp)]
        self.session = Session(sid, req.host, req.port, req.backend, submit_all(jobs))
        return self.session

    def close(self, submit_all) -> None:  # noqa: ANN001
        if self.session is not None:
            submit_all([WeightsCloseJob()] * self.dp)
            self.session = None

    async def start_update(self, req: WeightsUpdateRequest, submit_all) -> Update:  # noqa: ANN001
        """Check the manifest and queue the receive on every replica."""
        session = self._current(req.session_id)
        await self._joined(session)
        running = [u for u in self.updates.values() if any(not f.done() for f in u.futures)]
        if running:
            raise WeightSyncError(409, f"update {running[0].update_id} is still running")
        self.validate(req)
        buckets = [(b.dtype, [(t.name, tuple(t.shape)) for t in b.tensors]) for b in req.buckets]
        update_id = next(self._ids)
        jobs = [WeightsReceiveJob(buckets, req.atomic, update_id)] * self.dp
        update = Update(update_id, submit_all(jobs))
        for r, fut in enumerate(update.futures):
            self._track(r, fut)
        self.updates = {k: v for k, v in self.updates.items() if k > update_id - 16}
        self.updates[update_id] = update
        return update

    def _current(self, session_id: str) -> Session:
        if self.session is None:
            raise WeightSyncError(409, "no trainer session: call /weights/init first")
        if self.session.session_id != session_id:
            raise WeightSyncError(409, f"session {session_id} is not the current one "
                                       f"({self.session.session_id}); another trainer took over")
        return self.session

    async def _joined(self, session: Session) -> None:
        replies = await asyncio.gather(*(asyncio.wrap_future(f) for f in session.joins))
        failed = [r for r in replies if isinstance(r, JobFailed)]
        if failed:
            raise WeightSyncError(409, f"replicas could not join the trainer's group: {failed[0].message}")

    def validate(self, req: WeightsUpdateRequest) -> None:
        """Reject unknown names, wrong shapes and wrong dtypes before anything is sent."""
        seen: set[str] = set()
        for b in req.buckets:
            try:
                to_dtype(b.dtype)
            except ValueError as exc:
                raise WeightSyncError(400, str(exc)) from None
            if b.dtype != self.dtype:
                raise WeightSyncError(400, f"bucket dtype {b.dtype} != serving dtype {self.dtype}: "
                                           f"cast the weights to {self.dtype} before sending")
            for t in b.tensors:
                if t.name in seen:
                    raise WeightSyncError(400, f"tensor {t.name!r} appears twice in the manifest")
                seen.add(t.name)
                self._check_tensor(TensorMeta(t.name, b.dtype, tuple(t.shape)))
        if not req.allow_partial_layers:
            self._check_whole_layers(seen)

    def _check_whole_layers(self, names: set[str]) -> None:
        """A layer is updated whole or not at all.

        vLLM reloads weights layer by layer and rebuilds a layer's fused tensors (qkv,
        gate_up) from the parts it is sent: sending ``q_proj`` without ``k_proj`` would
        leave the rest of that fused tensor uninitialized, silently.
        """
        if self.checkpoint is None:
            return
        touched = {_layer_key(n) for n in names} - {None}
        for key in sorted(touched, key=str):
            missing = sorted(n for n in self.checkpoint if _layer_key(n) == key and n not in names)
            if missing:
                raise WeightSyncError(400, f"the manifest updates part of layer {key[0]}.{key[1]} but not "
                                           f"{missing[0]} ({len(missing)} missing): send whole layers")

    def _check_tensor(self, meta: TensorMeta) -> None:
        if self.checkpoint is None:
            return  # no local safetensors to check against; vLLM's loader still checks names
        if meta.name not in self.checkpoint:
            raise WeightSyncError(400, f"tensor {meta.name!r} is not a weight of the served model")
        _, shape = self.checkpoint[meta.name]
        if tuple(shape) != meta.shape:
            raise WeightSyncError(400, f"tensor {meta.name!r} has shape {list(meta.shape)}, "
                                       f"the served model expects {list(shape)}")

    async def finish(self, update_id: int) -> Update:
        """Wait for every replica's part of an update and record the outcome."""
        update = self.updates.get(update_id)
        if update is None:
            raise WeightSyncError(404, f"no update {update_id} (recent ones: {sorted(self.updates)})")
        replies = await asyncio.gather(*(asyncio.wrap_future(f) for f in update.futures),
                                       return_exceptions=True)
        errors = [r.message if isinstance(r, JobFailed) else str(r)
                  for r in replies if not isinstance(r, JobDone)]
        update.error = errors[0] if errors else None
        versions = [r.weight_version for r in replies if isinstance(r, JobDone)]
        update.weight_version = min(versions) if versions else None
        return update
