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

Only the trainer's rank 0 calls this. When the model is sharded (ZeRO-3, FSDP2) every
gather is a collective of the whole training job: rank 0 broadcasts the bucket plan
(names only) on the job's default process group once the server accepted it, and every
other rank calls :func:`follow_push`, which gathers the same buckets in the same order and
sends nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from vroll.client import GenerationClient, ServerError
from vroll.flags import check
from vroll.flags import field as flag
from vroll.protocol import SYNC_TIMEOUT_RANGE_S
from vroll.weightsync.buckets import Bucket, pack, plan_buckets, to_dtype
from vroll.weightsync.group import SyncGroup, host_store, make_group
from vroll.weightsync.source import ModelSource

log = logging.getLogger(__name__)


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
    return [name for name, t in tensors.items() if not bool(torch.isfinite(t.to(dtype or t.dtype)).all())]


class WeightSender:
    """Opens a session with a server and pushes weights to all its workers."""

    def __init__(self, client: GenerationClient, config: WeightSyncConfig | None = None) -> None:
        self.client = client
        self.config = config or WeightSyncConfig()
        self.group: SyncGroup | None = None
        self.session_id: str | None = None
        self.dtype: torch.dtype | None = None

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

    def push(self, model: torch.nn.Module | ModelSource) -> SyncStats:
        """Send the model's weights to every worker; returns when they serve them."""
        if self.group is None:
            self.connect()
        assert self.group is not None and self.dtype is not None and self.session_id is not None
        source = model if isinstance(model, ModelSource) else ModelSource(model, self.dtype)
        times = PhaseTimes()
        start = time.perf_counter()
        plan = plan_buckets(source.metadata(), int(self.config.bucket_mb * 2**20))
        followers = source.sharded and _job_world_size() > 1
        try:
            update = self.client.weights_update(self.session_id, plan, self.config.atomic)
        except ServerError as exc:
            if followers:
                _broadcast_plan(None)  # the other ranks stop waiting for buckets
            raise WeightSyncError(f"server refused the weight update: {exc.reason}") from None
        if followers:
            _broadcast_plan([[t.name for t in b.tensors] for b in plan])
        times.manifest_s = time.perf_counter() - start
        bad = self._transfer(source, plan, times)
        mark = time.perf_counter()
        try:
            status = self.client.weights_status(self.session_id, update.update_id)
        except ServerError as exc:
            raise WeightSyncError(f"weight update {update.update_id}: {exc.reason}") from None
        times.load_s = time.perf_counter() - mark
        if bad:
            raise WeightSyncError(
                f"the model has NaN/inf values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}: sync "
                f"cancelled, the server keeps serving weight_version {status.weight_version} (training diverged? "
                f"lower the learning rate, or keep max_grad_norm > 0)")
        if status.state == "failed":
            raise WeightSyncError(f"weight update {update.update_id} failed: {status.error}")
        seconds = time.perf_counter() - start
        return SyncStats(update.num_bytes, sum(len(b.tensors) for b in plan), len(plan), seconds,
                         status.weight_version, times)

    def _transfer(self, source: ModelSource, plan: list[Bucket], times: PhaseTimes) -> list[str]:
        """Every bucket, then the barrier; returns the names of tensors holding NaN/inf."""
        assert self.group is not None
        bad: list[str] = []
        with source.session():
            for bucket in plan:
                bad += self.send_bucket(source, bucket, times)
        mark = time.perf_counter()
        self.group.all_ok(not bad)  # False: the workers drop what they received (atomic mode)
        times.barrier_s = time.perf_counter() - mark
        return bad

    def send_bucket(self, source: ModelSource, bucket: Bucket, times: PhaseTimes | None = None) -> list[str]:
        """Broadcast one bucket; returns the names of its tensors holding NaN/inf (normally none)."""
        assert self.group is not None
        times = times or PhaseTimes()
        t0 = time.perf_counter()
        with source.gather([t.name for t in bucket.tensors], cast=False) as tensors:  # pack casts
            t1 = time.perf_counter()
            flat = pack(bucket, tensors, self.group.device)
            # rare path: name the culprits, in the wire dtype (fp16 overflows to inf)
            bad = [] if bool(torch.isfinite(flat).all()) else nonfinite_names(tensors, flat.dtype)
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        self.group.broadcast(flat, src=0)
        times.gather_s += (t1 - t0) + (t3 - t2)  # entering and leaving the gather
        times.pack_s += t2 - t1
        times.broadcast_s += time.perf_counter() - t3
        return bad

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


def _job_world_size() -> int:
    """Processes in the training job's default group (1 outside a distributed job)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast_plan(names: list[list[str]] | None) -> list[list[str]] | None:
    """Rank 0's bucket plan (tensor names per bucket; None: no sync) to every rank of the job."""
    import torch.distributed as dist

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
