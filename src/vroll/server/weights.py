"""The server's side of weight sync: trainer sessions, manifest checks, update tracking.

Order of one sync, as the server sees it (the trainer's side is in
``vroll.weightsync.sender``; the workers' in ``vroll.engine.worker_extension``):

1. ``/weights/init``: the request is checked (timeout range, backend), then the
   trainer's rendezvous store must answer within ``PROBE_TIMEOUT_S``; only then is
   every replica told to join the trainer's group (rank ``1 + r*T + t``), a join the
   workers bound themselves. A session whose trainer's store no longer answers is
   stale and is replaced; a live one is kept (409) unless the request forces.
2. ``/weights/update``: the manifest is checked against the checkpoint's names,
   shapes and dtypes *before* any byte moves, then one receive job is queued on
   every replica behind the jobs already queued there.
3. ``GET /weights/update/{id}``: waits for every replica and reports the new version.

Session ids are unguessable and never appear in an error or a log line; every route
but init needs the current one (403 otherwise).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from vroll.protocol import (
    SYNC_TIMEOUT_RANGE_S,
    Bucket,
    Job,
    JobDone,
    JobFailed,
    TensorMeta,
    WeightsCloseJob,
    WeightsInitJob,
    WeightsInitRequest,
    WeightsReceiveJob,
    WeightsUpdateRequest,
    dtype_size,
    is_floating,
)
from vroll.server.errors import ApiError
from vroll.weightsync.group import PROBE_THREAD, store_answers

PROBE_TIMEOUT_S = 3.0  # how long /weights/init waits for the trainer's rendezvous to answer
MAX_PENDING_PROBES = 32  # probe threads left waiting on silent ports, at most (more: 503 until they end)
SubmitAll = Callable[[list[Job]], list[Future]]


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
    session_id: str
    plan: list[Bucket]
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


async def _no() -> bool:
    return False


async def rendezvous_answers(host: str, port: int) -> bool:
    """Whether a trainer's store answers at ``host:port`` (bounded, off the event loop)."""
    return await asyncio.to_thread(store_answers, host, port, PROBE_TIMEOUT_S)


@dataclass
class WeightSessions:
    """At most one trainer session, and the updates it has made."""

    dp: int
    tp: int
    dtype: str
    device: str
    checkpoint: dict[str, TensorMeta] | None
    session: Session | None = None
    updates: dict[int, Update] = field(default_factory=dict)
    replica_versions: list[int] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _opening: asyncio.Lock = field(default_factory=asyncio.Lock)
    max_pending_probes: int = MAX_PENDING_PROBES

    def __post_init__(self) -> None:
        self.replica_versions = [0] * self.dp

    @property
    def weight_version(self) -> int:
        """The version every replica serves (the lowest, if one lags after a failure)."""
        return min(self.replica_versions, default=0)

    def track(self, replica: int, fut: Future) -> None:
        def record(done: Future) -> None:
            reply = None if done.exception() else done.result()
            if isinstance(reply, JobDone):
                self.replica_versions[replica] = reply.weight_version

        fut.add_done_callback(record)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp + 1

    def _check_init(self, req: WeightsInitRequest) -> None:
        lo, hi = SYNC_TIMEOUT_RANGE_S
        if not lo <= req.timeout_s <= hi:
            raise ApiError(400, f"timeout_s must be in {lo:g}..{hi:g} seconds, got {req.timeout_s}")
        if req.backend == "nccl" and self.device == "cpu":
            raise ApiError(400, "backend 'nccl' needs GPUs but this server runs on CPU: use 'gloo'")

    async def open(self, req: WeightsInitRequest, submit_all: SubmitAll) -> Session:
        """Start a session, replacing a stale one; refuses a second live trainer.

        Nothing reaches a replica until the trainer's store has answered, so an init
        naming a wrong address costs a 400 and never blocks generation.
        """
        self._check_init(req)

        def joins(sid: str) -> list[Job]:
            return [WeightsInitJob(req.host, req.port, req.backend, self.world_size, 1 + r * self.tp,
                                   req.timeout_s, sid) for r in range(self.dp)]

        return await self.claim(req.host, req.port, req.backend, req.force, joins, submit_all)

    async def claim(self, host: str, port: int, backend: str, force: bool, joins: Callable[[str], list[Job]],
                    submit_all: SubmitAll) -> Session:
        """The one-trainer rule, for either protocol: a live session elsewhere is kept (409) unless
        ``force``; the new trainer's store must answer before ``joins(session_id)`` reach the replicas.

        The probes run before the lock: concurrent inits each wait one probe, not the sum of all
        before them (issue 25 found four dead-port inits answered at 3.5, 7, 10.5 and 14 s)."""
        old = self.session
        ask_old = old is not None and not force and (old.host, old.port) != (host, port)
        new_answers, old_alive = await asyncio.gather(
            self._answers(host, port), self._answers(old.host, old.port) if ask_old and old else _no())
        async with self._opening:
            if self.session is not old:  # another init won meanwhile: its store answered a moment ago
                old = self.session
                old_alive = old is not None and (old.host, old.port) != (host, port) and not force
            if old_alive:
                raise ApiError(409, "another trainer is connected; stop it first, or pass force=true to "
                                    "take over")
            if not new_answers:
                raise ApiError(400, f"no weight-sync rendezvous answered at {host}:{port} within "
                                    f"{PROBE_TIMEOUT_S:g} s: start the trainer's store first and give an "
                                    "address this server can reach")
            if self.session is not None:
                submit_all([WeightsCloseJob()] * self.dp)
            sid = secrets.token_urlsafe(24)
            self.session = Session(sid, host, port, backend, submit_all(joins(sid)))
            return self.session

    async def _answers(self, host: str, port: int) -> bool:
        """:func:`rendezvous_answers`, refused (503) while too many earlier probes still wait on ports that
        accepted and never answered (each holds a thread until its peer closes)."""
        stuck = sum(t.name == PROBE_THREAD for t in threading.enumerate())
        if stuck >= self.max_pending_probes:
            raise ApiError(503, f"{stuck} weight-sync probes still wait on ports that accept connections and "
                                "never answer; try again later")
        return await rendezvous_answers(host, port)

    async def close(self, session_id: str, submit_all: SubmitAll) -> None:
        """End the current session (only its own trainer may)."""
        async with self._opening:
            self.current(session_id)
            submit_all([WeightsCloseJob()] * self.dp)
            self.session = None

    async def start_update(self, req: WeightsUpdateRequest, submit_all: SubmitAll) -> Update:
        """Check the manifest and queue the receive on every replica."""
        session = self.current(req.session_id)
        await self.joined(session)
        session = self.current(req.session_id)  # still ours after the wait
        running = [u for u in self.updates.values() if any(not f.done() for f in u.futures)]
        if running:
            raise ApiError(409, f"update {running[0].update_id} is still running")
        plan = req.plan()
        if req.lora is None:
            self.validate(plan, req.allow_partial_layers)
        else:  # adapter factors are no served weights: the workers check them against vLLM's LoRA config
            self.validate_dtype(plan)
        update_id = next(self._ids)
        lora = None if req.lora is None else req.lora.model_dump()
        jobs: list[Job] = [WeightsReceiveJob(plan, req.atomic or lora is not None, update_id, lora)] * self.dp
        update = Update(update_id, session.session_id, plan, submit_all(jobs))
        for r, fut in enumerate(update.futures):
            self.track(r, fut)
        self.updates = {k: v for k, v in self.updates.items() if k > update_id - 16}
        self.updates[update_id] = update
        return update

    def current(self, session_id: str) -> Session:
        if self.session is None:
            raise ApiError(409, "no trainer session: call /weights/init first")
        if not hmac.compare_digest(self.session.session_id.encode(), session_id.encode()):
            raise ApiError(403, "this weight-sync session is not the current one: another trainer took "
                                "over (or the session id is wrong)")
        return self.session

    async def joined(self, session: Session) -> None:
        replies = await asyncio.gather(*(asyncio.wrap_future(f) for f in session.joins), return_exceptions=True)
        failed = [r.message if isinstance(r, JobFailed) else str(r) for r in replies if not isinstance(r, JobDone)]
        if failed:
            raise ApiError(409, f"replicas could not join the trainer's group: {failed[0]}")

    def validate_dtype(self, plan: list[Bucket]) -> None:
        """A LoRA plan's buckets: in the serving dtype, each name once."""
        names = [t.name for b in plan for t in b.tensors]
        if len(set(names)) != len(names):
            raise ApiError(400, "a tensor appears twice in the manifest")
        if bad := [b.dtype for b in plan if b.dtype != self.dtype]:
            raise ApiError(400, f"bucket dtype {bad[0]} != serving dtype {self.dtype}: cast the adapter to "
                                f"{self.dtype} before sending")

    def validate(self, plan: list[Bucket], allow_partial_layers: bool = False) -> None:
        """Reject unknown names, wrong shapes and wrong dtypes before anything is sent."""
        seen: set[str] = set()
        for b in plan:
            try:
                dtype_size(b.dtype)
            except ValueError as exc:
                raise ApiError(400, str(exc)) from None
            if b.dtype != self.dtype:
                raise ApiError(400, f"bucket dtype {b.dtype} != serving dtype {self.dtype}: "
                                    f"cast the weights to {self.dtype} before sending")
            for t in b.tensors:
                if t.name in seen:
                    raise ApiError(400, f"tensor {t.name!r} appears twice in the manifest")
                seen.add(t.name)
                self.check_tensor(t)
        if not allow_partial_layers:
            self.check_whole_layers(seen)

    def check_whole_layers(self, names: set[str]) -> None:
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
                raise ApiError(400, f"the manifest updates part of layer {key[0]}.{key[1]} but not "
                                    f"{missing[0]} ({len(missing)} missing): send whole layers")

    def check_tensor(self, meta: TensorMeta) -> None:
        if self.checkpoint is None:
            return  # no local safetensors to check against; vLLM's loader still checks names
        served = self.checkpoint.get(meta.name)
        if served is None:
            raise ApiError(400, f"tensor {meta.name!r} is not a weight of the served model")
        if served.shape != meta.shape:
            raise ApiError(400, f"tensor {meta.name!r} has shape {list(meta.shape)}, "
                                f"the served model expects {list(served.shape)}")
        if not is_floating(served.dtype):  # e.g. int32 packed quantized weights: a float cast garbles them
            raise ApiError(400, f"tensor {meta.name!r} is {served.dtype} in the served checkpoint; weight "
                                "sync sends floating-point weights only")

    def _update(self, session_id: str, update_id: int) -> Update:
        session = self.current(session_id)
        update = self.updates.get(update_id)
        if update is None or update.session_id != session.session_id:
            mine = sorted(k for k, u in self.updates.items() if u.session_id == session.session_id)
            raise ApiError(404, f"no update {update_id} in this session (recent ones: {mine})")
        return update

    def peek(self, session_id: str, update_id: int) -> tuple[str, str | None]:
        """An update's state now, without waiting: ``failed`` (and why) as soon as one replica's part
        failed, ``done`` once every part is, else ``running``. The trainer asks this while a collective
        stalls, to tell a slow replica from a dead one."""
        update = self._update(session_id, update_id)
        for fut in update.futures:
            if fut.cancelled():
                return "failed", "cancelled (the server is stopping)"
            if fut.done():
                reply = fut.exception() or fut.result()
                if not isinstance(reply, JobDone):
                    return "failed", reply.message if isinstance(reply, JobFailed) else str(reply)
        return ("done" if all(f.done() for f in update.futures) else "running"), None

    async def finish(self, session_id: str, update_id: int) -> Update:
        """Wait for every replica's part of an update and record the outcome."""
        update = self._update(session_id, update_id)
        replies = await asyncio.gather(*(asyncio.wrap_future(f) for f in update.futures),
                                       return_exceptions=True)
        errors = [r.message if isinstance(r, JobFailed) else str(r)
                  for r in replies if not isinstance(r, JobDone)]
        update.error = errors[0] if errors else None
        versions = [r.weight_version for r in replies if isinstance(r, JobDone)]
        update.weight_version = min(versions) if versions else None
        return update
