"""vLLM's weight-transfer API (what TRL 1.16's ``VLLMClient`` calls) on vroll's weight sessions.

vLLM's routes carry no session: whoever can reach the port may push. vroll keeps its rules:

- **One trainer, whose session nobody else can take.** ``/init_weight_transfer_engine`` claims the
  server's one weight session (``WeightSessions.claim``: a live trainer elsewhere gets 409, the
  trainer's store must answer first) and answers with a cookie holding the unguessable session
  id. TRL's client sends every request through one ``requests.Session``, which sends the cookie
  back; any other caller of the update routes gets 403 (or 409 when no session is open).
- **Strict 4xx before any byte moves.** The manifest of ``/update_weights`` is checked against the
  served checkpoint (names, shapes, floating dtypes, no tensor twice), and the workers' group size
  against ``init_info.world_size``.
- **No mixed versions.** Tensors are staged in the workers and loaded together at
  ``/finish_weight_update``, one barrier job per replica (``vroll.server.replica``): generations sent
  before it finish on the old weights, those sent after run on the new ones; whole layers only.
- **Restarts.** A replica that restarted serves the base weights and is out of the trainer's group:
  the session's update routes answer 409 until the trainer calls ``/init_weight_transfer_engine`` again.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field

from vroll.protocol import (
    SYNC_TIMEOUT_RANGE_S,
    Job,
    JobDone,
    JobFailed,
    TensorMeta,
    TransferCommitJob,
    TransferDropJob,
    TransferInitInfo,
    TransferInitJob,
    TransferReceiveJob,
    TransferUpdateInfo,
    dtype_size,
    is_floating,
)
from vroll.server.errors import ApiError
from vroll.server.weights import Session, SubmitAll, WeightSessions

BACKEND = "vllm-native"  # the session's protocol, next to vroll's own "gloo" / "nccl"
COLLECTIVE_TIMEOUT_S = SYNC_TIMEOUT_RANGE_S[1]  # vLLM's init info has no timeout: vroll's longest


@dataclass
class NativeTransfer:
    """The native protocol's state beside ``WeightSessions``: the cookie, the open update, the packing."""

    cookie: str = field(default_factory=lambda: f"vroll-transfer-{secrets.token_hex(4)}")  # one per server
    staged: dict[str, TensorMeta] | None = None  # received since /start_weight_update; None: none open
    packed: bool = False
    buffer_bytes: int = 0
    lost: str | None = None  # why the current session can push no more (a replica restarted)
    _busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    def replica_restarted(self, index: int) -> None:
        self.lost = (f"replica {index} restarted since /init_weight_transfer_engine and serves the base "
                     "weights, outside the trainer's group: initialize the weight transfer again")

    async def open(self, ws: WeightSessions, info: TransferInitInfo, submit_all: SubmitAll) -> Session:
        """Claim the session, then wait until every worker joined the trainer's group."""
        workers = ws.dp * ws.tp
        if info.world_size != info.rank_offset + workers:
            raise ApiError(400, f"init_info.world_size is {info.world_size}, but this server's {workers} "
                                f"worker(s) after rank_offset {info.rank_offset} make "
                                f"{info.rank_offset + workers} (GET /get_world_size)")

        def joins(sid: str) -> list[Job]:
            return [TransferInitJob(info.master_address, info.master_port, info.world_size,
                                    info.rank_offset + r * ws.tp, COLLECTIVE_TIMEOUT_S) for r in range(ws.dp)]

        async with self._busy:
            session = await ws.claim(info.master_address, info.master_port, BACKEND, False, joins, submit_all)
            self.staged, self.lost = None, None
            self.packed, self.buffer_bytes = info.packed, info.packed_buffer_size_bytes
            await ws.joined(session)
            return session

    def _session(self, ws: WeightSessions, session_id: str | None) -> Session:
        if ws.session is None or ws.session.backend != BACKEND:
            raise ApiError(409, "no weight-transfer session: call /init_weight_transfer_engine first")
        if not session_id:
            raise ApiError(403, "this request carries no weight-transfer session: send the cookie that "
                                "/init_weight_transfer_engine set (TRL's client does)")
        session = ws.current(session_id)
        if self.lost:
            raise ApiError(409, self.lost)
        return session

    async def start(self, ws: WeightSessions, session_id: str | None, submit_all: SubmitAll) -> None:
        """Open an update; one still open from this trainer is dropped (its tensors were never loaded)."""
        async with self._busy:
            self._session(ws, session_id)
            if self.staged:
                await _all_done(submit_all([TransferDropJob()] * ws.dp))
            self.staged = {}

    async def receive(self, ws: WeightSessions, session_id: str | None, update: TransferUpdateInfo,
                      submit_all: SubmitAll) -> int:
        """Check the manifest, then receive it on every replica; returns the bytes received."""
        async with self._busy:
            self._session(ws, session_id)
            tensors = update.tensors()
            packed = self.packed if update.packed is None else update.packed
            try:
                if self.staged is None:
                    raise ApiError(409, "no weight update is open: call /start_weight_update first")
                self._check(ws, tensors)
            except ApiError:
                await self._drain(ws, tensors, packed, submit_all)
                raise
            jobs: list[Job] = [TransferReceiveJob(tuple(tensors), packed, self.buffer_bytes)] * ws.dp
            failed = await _all_done(submit_all(jobs))
            if failed:
                self.staged = None  # every replica dropped or never got its part
                raise ApiError(409, f"receiving the weights failed, the served weights are unchanged: {failed}")
            self.staged.update((t.name, t) for t in tensors)
            return sum(t.nbytes for t in tensors)

    async def _drain(self, ws: WeightSessions, tensors: list[TensorMeta], packed: bool,
                     submit_all: SubmitAll) -> None:
        """The trainer broadcasts the refused tensors anyway (vLLM's protocol sends the request and the
        bytes at once, and TRL's client reads the reply only after its last broadcast): the workers take
        them off the wire and drop them, so the trainer is released and sees the 4xx instead of hanging
        in its broadcast. A manifest whose byte size is unknown (a dtype without a size) cannot be drained."""
        if not all(_sized(t.dtype) for t in tensors):
            return
        job = TransferReceiveJob(tuple(tensors), packed, self.buffer_bytes, discard=True)
        failed = await _all_done(submit_all([job] * ws.dp))
        if failed:
            self.staged = None  # the group may be out of step now: nothing staged stays loadable
            self.lost = f"the workers lost the trainer's group while dropping a refused update ({failed}): " \
                        "initialize the weight transfer again"

    def _check(self, ws: WeightSessions, tensors: list[TensorMeta]) -> None:
        assert self.staged is not None
        seen: set[str] = set()
        for t in tensors:
            try:
                dtype_size(t.dtype)
            except ValueError as exc:
                raise ApiError(400, f"tensor {t.name!r}: {exc}") from None
            if not is_floating(t.dtype):
                raise ApiError(400, f"tensor {t.name!r} is {t.dtype}: weights travel as floating-point tensors")
            if t.name in seen or t.name in self.staged:
                raise ApiError(400, f"tensor {t.name!r} is sent twice in this weight update")
            seen.add(t.name)
            ws.check_tensor(t)

    async def finish(self, ws: WeightSessions, session_id: str | None, submit_all: SubmitAll) -> int:
        """Load what was staged, on every replica at once; returns the weight version now served."""
        async with self._busy:
            self._session(ws, session_id)
            if self.staged is None:
                raise ApiError(409, "no weight update is open: call /start_weight_update first")
            staged, self.staged = self.staged, None
            if not staged:
                return ws.weight_version
            try:
                ws.check_whole_layers(set(staged))
            except ApiError:
                await _all_done(submit_all([TransferDropJob()] * ws.dp))
                raise
            futures = submit_all([TransferCommitJob()] * ws.dp)
            for r, fut in enumerate(futures):
                ws.track(r, fut)
            failed = await _all_done(futures)
            if failed:
                raise ApiError(503, f"loading the weights failed: {failed}")
            return ws.weight_version

    async def close(self, ws: WeightSessions, session_id: str | None, submit_all: SubmitAll) -> None:
        async with self._busy:
            self._session(ws, session_id)
            await ws.close(session_id or "", submit_all)
            self.staged = None


def _sized(dtype: str) -> bool:
    try:
        dtype_size(dtype)
    except ValueError:
        return False
    return True


async def _all_done(futures: list) -> str | None:
    """Wait for every replica's reply; the first failure's reason, or None."""
    replies = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
    for reply in replies:
        if not isinstance(reply, JobDone):
            return reply.message if isinstance(reply, JobFailed) else str(reply)
    return None
