"""``WeightSyncClient``: the trainer's side of a weight sync.

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

Only the trainer's rank 0 calls this; other ranks only take part in step 2's gathers
when the model is sharded (they must call :meth:`gather_only` in lockstep).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch

from vroll.client import GenerationClient, ServerError
from vroll.flags import check, field
from vroll.weightsync.buckets import Bucket, pack, plan_buckets, to_dtype
from vroll.weightsync.group import SyncGroup, host_store, make_group
from vroll.weightsync.source import ModelSource

log = logging.getLogger(__name__)


@dataclass
class WeightSyncConfig:
    bucket_mb: float = field(512.0, help="bucket size in MiB: one broadcast per bucket")
    backend: Literal["auto", "nccl", "gloo"] = field("auto", help="nccl on GPU, gloo on CPU (auto)")
    host: str = field("127.0.0.1", help="address the server's workers use to reach this trainer")
    port: int = field(0, help="rendezvous port on this trainer (0: a free one)")
    timeout_s: float = field(600.0, help="give up on a peer that sends/receives nothing this long")
    atomic: bool = field(True, help="workers receive everything before loading (old weights kept on failure)")

    def __post_init__(self) -> None:
        check(self.bucket_mb > 0, f"bucket_mb must be positive, got {self.bucket_mb}")
        check(self.timeout_s > 0, f"timeout_s must be positive, got {self.timeout_s}")
        check(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}")


class WeightSyncError(RuntimeError):
    """A sync the server refused or could not complete."""


@dataclass(frozen=True)
class SyncStats:
    """What one sync moved and how long it took."""

    num_bytes: int
    num_tensors: int
    num_buckets: int
    seconds: float
    weight_version: int

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def _wire(bucket: Bucket) -> dict:
    return {"dtype": bucket.dtype, "tensors": [{"name": t.name, "shape": list(t.shape)} for t in bucket.tensors]}


def nonfinite_names(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[str]:
    """Names of the tensors that hold a NaN or an infinity (once cast to ``dtype``)."""
    return [name for name, t in tensors.items() if not bool(torch.isfinite(t.to(dtype or t.dtype)).all())]


class WeightSyncClient:
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
        store = host_store(cfg.host, cfg.port, 1, cfg.timeout_s)
        resp = self.client.weights_init(cfg.host, store.port, backend, cfg.timeout_s, force=force)
        self.group = make_group(store, 0, resp.world_size, backend, cfg.timeout_s, resp.session_id)
        self.session_id = resp.session_id
        self.dtype = to_dtype(resp.dtype)
        log.info("weight sync: session %s, %d ranks over %s", resp.session_id, resp.world_size, backend)

    def push(self, model: torch.nn.Module | ModelSource) -> SyncStats:
        """Send the model's weights to every worker; returns when they serve them."""
        if self.group is None:
            self.connect()
        assert self.group is not None and self.dtype is not None and self.session_id is not None
        source = model if isinstance(model, ModelSource) else ModelSource(model, self.dtype)
        start = time.perf_counter()
        plan = plan_buckets(source.metadata(), int(self.config.bucket_mb * 2**20))
        try:
            update = self.client.weights_update(self.session_id, [_wire(b) for b in plan], self.config.atomic)
        except ServerError as exc:
            raise WeightSyncError(f"server refused the weight update: {exc.reason}") from None
        bad: list[str] = []
        with source.session():
            for bucket in plan:
                bad += self._send(source, bucket)
        self.group.all_ok(not bad)  # False: the workers drop what they received (atomic mode)
        status = self.client.weights_status(update.update_id)
        if bad:
            raise WeightSyncError(
                f"the model has NaN/inf values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}: sync "
                f"cancelled, the server keeps serving weight_version {status.weight_version} (training diverged? "
                f"lower the learning rate, or keep max_grad_norm > 0)")
        if status.state == "failed":
            raise WeightSyncError(f"weight update {update.update_id} failed: {status.error}")
        seconds = time.perf_counter() - start
        return SyncStats(update.num_bytes, sum(len(b.tensors) for b in plan), len(plan), seconds,
                         status.weight_version)

    def _send(self, source: ModelSource, bucket: Bucket) -> list[str]:
        """Broadcast one bucket; returns the names of its tensors holding NaN/inf (normally none)."""
        assert self.group is not None
        with source.gather([t.name for t in bucket.tensors], cast=False) as tensors:  # pack casts
            flat = pack(bucket, tensors, self.group.device)
            # rare path: name the culprits, in the wire dtype (fp16 overflows to inf)
            bad = [] if bool(torch.isfinite(flat).all()) else nonfinite_names(tensors, flat.dtype)
        self.group.broadcast(flat, src=0)
        return bad

    def close(self) -> None:
        """End the session (the server keeps serving the last weights)."""
        if self.group is not None:
            try:
                self.client.weights_close()
            except ServerError as exc:
                log.warning("weights/close: %s", exc)
            self.group.close()
            self.group = None
