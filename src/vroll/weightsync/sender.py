"""``WeightSender``: the trainer's side of a weight sync.

Order of one sync (the workers mirror it in ``vroll.engine.worker_extension``):

1. ``POST /weights/update`` with the bucket plan: the server checks names, shapes and
   dtype against the served model and queues one receive job per replica. Nothing
   has moved yet, so a rejected plan costs nothing.
2. For each bucket, in plan order: gather its tensors (ZeRO-3/FSDP2: only this
   bucket), pack them into one flat buffer, broadcast it from rank 0.
3. ``all_ok`` barrier: returns once every worker holds every byte. The trainer votes
   "not ok" if any bucket held NaN/inf: the workers then drop what they received and
   keep serving the previous weights (a diverged model is never pushed).
4. ``GET /weights/update/{id}``: waits until every replica has loaded the weights,
   reset its prefix cache and bumped ``weight_version``; raises if any failed.

Every call names the session id ``/weights/init`` returned; the server refuses any
other. :class:`SyncStats` says how long each step took (``PhaseTimes``).

Several servers (:func:`push_all`, which :meth:`WeightSender.push` calls with one): one
session and one process group per server, this trainer rank 0 of each; every step above
is taken with every server before the next, and in step 2 each bucket is gathered and
packed once and broadcast in every group (started in all, then waited for) before the
next bucket is gathered. Atomicity stays per server: one that fails a step leaves the
push, keeps its previous weights, and the others complete theirs. A server that died or
hangs mid-collective is found by asking it (``_Push.settle``), not by waiting out the
group's timeout, which would also time out the other servers' workers waiting for the
next bucket.

Only the trainer's rank 0 calls this. When the model is sharded (ZeRO-3, FSDP2) every
gather is a collective of the whole training job: rank 0 broadcasts the bucket plan
(names only) on the job's default process group once the server accepted it, and every
other rank calls :func:`follow_push`, which gathers the same buckets in the same order and
sends nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
import torch.distributed as dist

from vroll.client import GenerationClient, ServerError, ServerUnavailable
from vroll.flags import check
from vroll.flags import field as flag
from vroll.protocol import SYNC_TIMEOUT_RANGE_S, Bucket
from vroll.weightsync.buckets import BucketBuffers, pack, plan_buckets, to_dtype, unpack
from vroll.weightsync.group import SyncGroup, host_store, make_group
from vroll.weightsync.source import AdapterSource, ModelSource

log = logging.getLogger(__name__)

T = TypeVar("T")

STALL_PROBE_S = 2.0  # a collective running longer: its server is asked whether it is still there, this often
STALL_PROBE_TIMEOUT_S = 5.0  # a server that does not answer that within this is gone (hung or unreachable)


@dataclass
class WeightSyncConfig:
    bucket_mb: float = flag(512.0, help="bucket size in MiB: one broadcast per bucket")
    backend: Literal["auto", "nccl", "gloo"] = flag("auto", help="nccl on GPU, gloo on CPU (auto)")
    host: str = flag("127.0.0.1", help="address the server's workers use to reach this trainer")
    port: int = flag(0, help="rendezvous port on this trainer (0: a free one)")
    timeout_s: float = flag(600.0, help="give up on a peer that sends/receives nothing this long (1..600)")
    atomic: bool = flag(True, help="workers receive everything before loading (old weights kept on failure)")

    def __post_init__(self) -> None:
        lo, hi = SYNC_TIMEOUT_RANGE_S
        check(self.bucket_mb > 0, f"bucket_mb must be positive, got {self.bucket_mb}")
        check(lo <= self.timeout_s <= hi, f"timeout_s must be in {lo:g}..{hi:g} s, got {self.timeout_s}")
        check(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}")


class WeightSyncError(RuntimeError):
    """A sync the server refused or could not complete."""


@dataclass
class PhaseTimes:
    """Seconds one push spent in each step, summed over its buckets.

    On GPU, packing and broadcasting are asynchronous: what they leave undone shows
    up in ``barrier_s``.
    """

    manifest_s: float = 0.0  # plan + POST /weights/update
    gather_s: float = 0.0  # materializing each bucket's tensors (ZeRO-3/FSDP2 gathers)
    pack_s: float = 0.0  # cast + copy into the flat buffer, NaN/inf check
    broadcast_s: float = 0.0
    barrier_s: float = 0.0  # until every worker holds every byte
    load_s: float = 0.0  # GET /weights/update/{id}: vLLM's reload and the prefix-cache reset


@dataclass(frozen=True)
class SyncStats:
    """What one sync moved and how long it took."""

    num_bytes: int
    num_tensors: int
    num_buckets: int
    seconds: float
    weight_version: int
    phases: PhaseTimes = field(default_factory=PhaseTimes)

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def nonfinite_names(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[str]:
    """Names of the tensors that hold a NaN or an infinity (once cast to ``dtype``)."""
    return [name for name, t in tensors.items() if not all_finite(t.to(dtype or t.dtype))]


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, in one reduction and one device sync: its minimum
    and maximum (NaN propagates through both; an infinity is one of them). Unlike a sum it cannot
    overflow on finite values (fp16 overflowed above 65504), and unlike ``isfinite().all()`` it
    builds no boolean copy (as fast as a sum: 27 ms on 135M bf16 values on one CPU core, against
    0.9 s)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.element_size() == 1:  # float8: no min/max kernels; rare enough for the element-wise check
        return bool(torch.isfinite(t.float()).all())
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(torch.stack([lo, hi])).all())


def packed_nonfinite(bucket: Bucket, flat: torch.Tensor) -> list[str]:
    """Names of the bucket's tensors holding NaN/inf, read from its packed buffer (what is sent, in the
    wire dtype): one reduction over the whole buffer, then, only when it finds one, one per tensor."""
    if all_finite(flat):
        return []
    return [name for name, view in unpack(bucket, flat) if not all_finite(view)]


class WeightSender:
    """Opens a session with a server and pushes weights to all its workers."""

    def __init__(self, client: GenerationClient, config: WeightSyncConfig | None = None) -> None:
        self.client = client
        self.config = config or WeightSyncConfig()
        self.group: SyncGroup | None = None
        self.session_id: str | None = None
        self.dtype: torch.dtype | None = None
        self._buffers: BucketBuffers | None = None  # the packing buffer, kept between pushes

    def connect(self, force: bool = False) -> None:
        """Rendezvous with every worker (``/weights/init`` + the process group)."""
        cfg = self.config
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and self.client.info().device == "cuda" else "gloo"
        if self.group is not None:
            self.group.close()
            self.group = None
        store = host_store(cfg.host, cfg.port, 1, cfg.timeout_s)
        resp = self.client.weights_init(cfg.host, store.port, backend, cfg.timeout_s, force=force)
        self.group = make_group(store, 0, resp.world_size, backend, cfg.timeout_s, resp.session_id)
        self.session_id = resp.session_id
        self.dtype = to_dtype(resp.dtype)
        log.info("weight sync: %d ranks over %s", resp.world_size, backend)

    def push(self, model: torch.nn.Module | ModelSource | AdapterSource) -> SyncStats:
        """Send the model's weights to every worker; returns when they serve them."""
        result = push_all([self], model)[0]
        if isinstance(result, WeightSyncError):
            raise result
        return result

    def buffers(self, device: torch.device) -> BucketBuffers:
        """The packing buffer on ``device``, kept from one push to the next (pinned on CPU next to a GPU)."""
        if self._buffers is None or self._buffers.device != device:
            self._buffers = BucketBuffers(device, pin=True)
        return self._buffers

    def send_bucket(self, source: ModelSource, bucket: Bucket, times: PhaseTimes | None = None) -> list[str]:
        """Broadcast one bucket; returns the names of its tensors holding NaN/inf (normally none)."""
        assert self.group is not None
        times = times or PhaseTimes()
        flat, bad = _packed(source, bucket, self.group.device, times)
        mark = time.perf_counter()
        self.group.broadcast(flat, src=0)
        times.broadcast_s += time.perf_counter() - mark
        return bad

    def abandon(self, in_flight: Sequence[dist.Work] = ()) -> None:
        """Drop the process group without a word to the server (it is gone, or its group broke mid-sync);
        a later push opens a new session. ``in_flight``: its collectives that never completed."""
        if self.group is not None:
            self.group.close(in_flight)
            self.group = None

    def close(self) -> None:
        """End the session (the server keeps serving the last weights)."""
        if self.group is not None:
            try:
                if self.session_id is not None:
                    self.client.weights_close(self.session_id)
            except ServerError as exc:
                log.warning("weights/close: %s", exc)
            self.group.close()
            self.group = None
        self._buffers = None


# What a server's failure looks like to the sender: an HTTP error or no answer (ServerError), a broken
# collective (gloo and NCCL raise RuntimeError subclasses), a rendezvous that never completed.
# Any of these ends that server's part of a push; the other servers' parts go on.
_SERVER_FAILURES = (ServerError, RuntimeError, TimeoutError, OSError)


def push_all(senders: Sequence[WeightSender],
             model: torch.nn.Module | ModelSource | AdapterSource) -> list[SyncStats | WeightSyncError]:
    """One sync to several servers, each through its own sender (its own session and process group,
    this trainer rank 0 of every group). One server is the case of :meth:`WeightSender.push`.

    Ordering: each step of the module docstring is taken with every server before the next step:
    every server gets the plan (1.); then bucket k is gathered and packed ONCE and its broadcast
    started in every group, and all of them finish, before bucket k + 1 is gathered (2.: a sharded
    model gathers each bucket once, however many servers; the groups move it at the same time);
    then each group's barrier (3.) and each server's load (4.). Atomicity is per server, as with
    one: a server that fails a step (no answer, a refused plan, a broken group, a failed load) is
    left out of the later steps and gets its :class:`WeightSyncError` in the result, one entry per
    sender; it keeps its previous weights, and the others finish their sync. Raises only when the
    model itself is bad (NaN/inf values: every server is told, none loads them).
    """
    return _Push(list(senders)).run(model)


class _Push:
    """One :func:`push_all`: the servers still in it, and why the others left."""

    def __init__(self, senders: list[WeightSender]) -> None:
        self.senders = senders
        self.errors: dict[int, WeightSyncError] = {}
        self.update_ids: dict[int, int] = {}
        self.times = PhaseTimes()

    def live(self) -> list[int]:
        return [i for i in range(len(self.senders)) if i not in self.errors]

    def each(self, step: Callable[[int, WeightSender], T], why: Callable[[int, BaseException], str]) -> dict[int, T]:
        """``step(i, sender)`` for every server still in the push; one that fails it leaves (``why``: the message)."""
        out: dict[int, T] = {}
        for i in self.live():
            try:
                out[i] = step(i, self.senders[i])
            except _SERVER_FAILURES as exc:
                self.errors[i] = WeightSyncError(why(i, exc))
                self.errors[i].__cause__ = exc
        return out

    def run(self, model: torch.nn.Module | ModelSource | AdapterSource) -> list[SyncStats | WeightSyncError]:
        start = time.perf_counter()
        self.each(lambda _, s: s.group is None and s.connect(), lambda _, e: f"cannot open a weight-sync session: {e}")
        live = [self.senders[i] for i in self.live()]
        first = live[0] if live else self.senders[0]
        if len({s.dtype for s in live}) > 1:
            raise ValueError(f"the servers serve different dtypes {sorted({str(s.dtype) for s in live})}: "
                             "one push cannot feed them all")
        source = model if isinstance(model, (ModelSource, AdapterSource)) else ModelSource(model, first.dtype or
                                                                                           torch.float32)
        plan = plan_buckets(source.metadata(), int(first.config.bucket_mb * 2**20))
        lora = getattr(source, "lora", None)  # an AdapterSource's: the buckets are a LoRA adapter
        updates = self.each(lambda _, s: s.client.weights_update(s.session_id, plan, s.config.atomic, lora=lora),
                            lambda _, e: f"server refused the weight update: {getattr(e, 'reason', e)}")
        self.update_ids = {i: u.update_id for i, u in updates.items()}
        if source.sharded and _job_world_size() > 1:  # the other ranks gather with us, or stop waiting
            _broadcast_plan([[t.name for t in b.tensors] for b in plan] if updates else None)
        self.times.manifest_s = time.perf_counter() - start
        if not updates:
            return [self.errors[i] for i in range(len(self.senders))]
        bad = self.transfer(source, plan)
        mark = time.perf_counter()
        statuses = self.each(lambda i, s: s.client.weights_status(s.session_id, updates[i].update_id),
                             lambda i, e: f"weight update {updates[i].update_id}: {getattr(e, 'reason', e)}")
        self.times.load_s = time.perf_counter() - mark
        if bad:
            kept = next(iter(statuses.values())).weight_version if statuses else "its last"
            raise WeightSyncError(
                f"the model has NaN/inf values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}: sync "
                f"cancelled, the server keeps serving weight_version {kept} (training diverged? "
                f"lower the learning rate, or keep max_grad_norm > 0)")
        seconds = time.perf_counter() - start
        out: list[SyncStats | WeightSyncError] = []
        for i in range(len(self.senders)):
            status = statuses.get(i)
            if status is None:
                out.append(self.errors[i])
            elif status.state == "failed":
                out.append(WeightSyncError(f"weight update {updates[i].update_id} failed: {status.error}"))
            else:
                out.append(SyncStats(updates[i].num_bytes, sum(len(b.tensors) for b in plan), len(plan), seconds,
                                     status.weight_version, self.times))
        return out

    def transfer(self, source: ModelSource | AdapterSource, plan: list[Bucket]) -> list[str]:
        """Every bucket to every group, bucket by bucket, then each group's barrier; returns the names of
        tensors holding NaN/inf. Buckets are gathered even when no group is left: the other ranks of a
        sharded model gather them too (collectives)."""
        bad: list[str] = []
        groups = [self.senders[i].group for i in self.live()]
        device = groups[0].device if groups and groups[0] is not None else torch.device("cpu")
        buffers = self.senders[0].buffers(device)
        with source.session():
            for k, bucket in enumerate(plan):
                flat, nonfinite = _packed(source, bucket, device, self.times, buffers)
                bad += nonfinite
                self.broadcast(k, flat)
        mark = time.perf_counter()
        # False: the workers drop what they received (atomic mode)
        why = "the weight-sync barrier failed"
        started = self.each(lambda _, s: s.group.start_all_ok(not bad)[0], lambda _, e: f"{why}: {e}")
        self.settle(started, why, barrier=True)
        self.times.barrier_s = time.perf_counter() - mark
        return bad

    def broadcast(self, k: int, flat: torch.Tensor) -> None:
        """Bucket ``k`` to every group still in the push: all started, then all waited for."""
        mark = time.perf_counter()
        why = f"broadcast of bucket {k} failed"
        works = self.each(lambda _, s: s.group.start_broadcast(flat.to(s.group.device), src=0),
                          lambda _, e: f"{why}: {e}")
        self.settle(works, why)
        self.times.broadcast_s += time.perf_counter() - mark

    def settle(self, works: dict[int, dist.Work], why: str, barrier: bool = False) -> None:
        """Wait for each server's collective; one whose server is gone leaves now, not at the group's timeout.

        A peer killed mid-collective can block it for the group's whole timeout (gloo, measured: the
        root's broadcast to a SIGKILLed worker ended after ``timeout_s``, up to 10 minutes; NCCL hangs
        until its watchdog). So while an operation runs longer than ``STALL_PROBE_S`` its server is
        asked for the update's state (``?wait=false``) every ``STALL_PROBE_S``: no answer, or a
        failed update (a replica died), and that server leaves this push at once; a slow one
        (draining long generations before it takes the weights) is waited for. NCCL's ``wait()``
        does not block the host (it orders this stream after the broadcast), so only its barrier,
        read on the host, is watched.
        """
        pending = {}
        for i, work in works.items():
            if barrier or self.senders[i].group.backend == "gloo":
                pending[i] = work
            else:
                self.finish(i, work, why)
        start = probed = time.monotonic()
        while pending:
            for i in [i for i, w in pending.items() if w.is_completed()]:
                self.finish(i, pending.pop(i), why)
            now = time.monotonic()
            if pending and now - probed >= STALL_PROBE_S:
                for i in list(pending):
                    if reason := self.gone(i):
                        self.errors[i] = WeightSyncError(f"{why}: {reason}")
                        self.senders[i].abandon([pending.pop(i)])
                probed = time.monotonic()
            if pending:
                time.sleep(min(max((now - start) / 20, 1e-4), 0.05))  # polling costs <= 5% of the wait

    def finish(self, i: int, work: dist.Work, why: str) -> None:
        """Wait for server ``i``'s completed (or stream-ordered) operation; a failed one ends its push."""
        try:
            work.wait()
        except _SERVER_FAILURES as exc:
            self.errors[i] = WeightSyncError(f"{why}: {exc}")
            self.errors[i].__cause__ = exc

    def gone(self, i: int) -> str | None:
        """Why server ``i`` cannot finish this push (it does not answer, or its update failed), or None."""
        sender = self.senders[i]
        try:
            status = sender.client.weights_status(sender.session_id, self.update_ids[i], wait=False,
                                                  timeout=STALL_PROBE_TIMEOUT_S)
        except ServerUnavailable as exc:
            return f"the server stopped answering ({exc.reason})"
        except ServerError as exc:  # e.g. 403: another trainer took the server over (force=True)
            return f"the server no longer reports this update ({exc.reason})"
        return f"the server's update failed ({status.error})" if status.state == "failed" else None


def _packed(source: ModelSource | AdapterSource, bucket: Bucket, device: torch.device, times: PhaseTimes,
            buffers: BucketBuffers | None = None) -> tuple[torch.Tensor, list[str]]:
    """One bucket gathered and packed on ``device`` (into ``buffers``' one buffer, when given: each
    bucket is sent before the next is packed), and the names of its tensors holding NaN/inf."""
    t0 = time.perf_counter()
    with source.gather([t.name for t in bucket.tensors], cast=False) as tensors:  # pack casts
        t1 = time.perf_counter()
        flat = pack(bucket, tensors, device, buffers.get(0, bucket) if buffers is not None else None)
        bad = packed_nonfinite(bucket, flat)
        t2 = time.perf_counter()
    times.gather_s += (t1 - t0) + (time.perf_counter() - t2)  # entering and leaving the gather
    times.pack_s += t2 - t1
    return flat, bad


def _job_world_size() -> int:
    """Processes in the training job's default group (1 outside a distributed job)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast_plan(names: list[list[str]] | None) -> list[list[str]] | None:
    """Rank 0's bucket plan (tensor names per bucket; None: no sync) to every rank of the job."""
    box = [names]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow_push(model: torch.nn.Module) -> bool:
    """The part of a sync that the other ranks of a sharded trainer play: gather every bucket
    rank 0 sends, in its order (ZeRO-3/FSDP2 gathers are collectives). Returns whether a sync
    happened; with an unsharded model (or one process) there is nothing to take part in."""
    source = ModelSource(model, torch.float32)  # the dtype is unused: nothing is cast or sent here
    if not source.sharded or _job_world_size() == 1:
        return False
    plan = _broadcast_plan(None)
    if plan is None:
        return False
    for names in plan:
        with source.gather(names, cast=False):
            pass
    return True
