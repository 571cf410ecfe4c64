"""``NativeWeightSender``: the trainer's side of a push to a *stock* ``vllm serve``, through vLLM's own RL routes.

The server runs vroll's ``vroll_gloo`` engine (``vroll.engine.gloo_transfer``, picked by
``--weight-transfer-config '{"backend": "vroll_gloo"}'``); this module is its trainer side and
imports nothing of vLLM: it hosts the ``TCPStore`` and is rank 0 of the gloo group
(:mod:`vroll.weightsync.group`), and speaks the routes over HTTP.

- connect: ``POST /init_weight_transfer_engine`` (its ``init_info``: :class:`GlooInitFields`) while
  this trainer builds its end of the group; both finish together.
- one push, in order:

  1. ``POST /pause?mode=wait``: requests in flight finish with the old weights, none starts (the
     prefix and multimodal caches are cleared, so nothing computed with the old weights is reused);
  2. ``POST /start_weight_update`` (vLLM's layerwise reload begins);
  3. ``POST /update_weights`` with the manifest (names, dtypes, shapes), sent from a thread while this
     trainer broadcasts the packed buffers (:func:`vroll.weightsync.buckets.packed_chunks` cuts them:
     vLLM's packed wire format); the workers load each buffer as it arrives;
  4. ``POST /finish_weight_update``, then ``POST /update_weight_version`` with this push's number;
  5. ``POST /resume``.

  So every completion is sampled by one known weight version: none runs between 1 and 5.

- stalls: every HTTP call and every broadcast is waited for in slices of ``STALL_PROBE_S``; after each
  the server is asked ``/health`` (``STALL_PROBE_TIMEOUT_S``). A server that does not answer makes the
  push fail within seconds with :class:`~vroll.weightsync.sender.WeightSyncError`, never a hang; a route
  that answers an error fails it at once. After a failed push the server stays paused, its weights
  half-loaded: it must not serve them; the next push reconnects and sends everything again.
"""

from __future__ import annotations

import concurrent.futures
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import httpx
import torch
import torch.distributed as dist

from vroll.protocol import TensorMeta
from vroll.weightsync.buckets import packed_chunks
from vroll.weightsync.group import SyncGroup, host_store, make_group
from vroll.weightsync.sender import (
    STALL_PROBE_S,
    STALL_PROBE_TIMEOUT_S,
    PhaseTimes,
    SyncStats,
    WeightSyncConfig,
    WeightSyncError,
    nonfinite_names,
)
from vroll.weightsync.source import ModelSource, unwrap

log = logging.getLogger(__name__)

T = TypeVar("T")

ENGINE_NAME = "vroll_gloo"  # the --weight-transfer-config backend this sender speaks to


@dataclass
class GlooInitFields:
    """``/init_weight_transfer_engine``'s ``init_info`` for ``vroll_gloo`` (the engine's init info type)."""

    master_address: str
    master_port: int
    world_size: int  # this trainer + every worker of the server
    rank_offset: int = 1  # worker ranks start after the trainer's 0
    session: str = "vroll-native"  # scopes the group's keys in the store (a reconnect uses a new one)
    timeout_s: float = 600.0  # the group's: a peer that sends/receives nothing this long fails its op
    packed: bool = True
    packed_buffer_size_bytes: int = 512 * 2**20


@dataclass
class GlooUpdateFields:
    """``/update_weights``'s ``update_info`` for ``vroll_gloo``: vLLM's nccl manifest, the same field names."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"update_info: {len(self.names)} names, {len(self.dtype_names)} dtype_names, "
                             f"{len(self.shapes)} shapes")

    def metas(self) -> list[TensorMeta]:
        return [TensorMeta(n, d, tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes, strict=True)]


def _in_thread(fn: Callable[[], T], name: str) -> concurrent.futures.Future[T]:
    """``fn()`` on a daemon thread: one stuck on a dead server never holds the interpreter's exit."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class NativeWeightSender:
    """Pushes a model to one stock ``vllm serve`` (its ``workers`` = TP x PP x DP) in the serving ``dtype``."""

    def __init__(self, base_url: str, api_key: str | None, config: WeightSyncConfig, workers: int,
                 dtype: torch.dtype) -> None:
        self.base_url = base_url.rstrip("/")
        self.config = config
        self.workers = workers
        self.dtype = dtype
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # every call is watched (``_wait``), so the read timeout only bounds a server that is alive but slow
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(config.timeout_s, connect=STALL_PROBE_TIMEOUT_S))
        self._probe = httpx.Client(base_url=self.base_url, headers=headers, timeout=STALL_PROBE_TIMEOUT_S)
        self.group: SyncGroup | None = None
        # broadcasts started and not seen complete: a gloo group dropped with one of them blocked on a dead peer
        # would join its threads, i.e. wait out the group's timeout; SyncGroup.close holds it on a daemon thread
        self._in_flight: list[dist.Work] = []

    # ------------------------------------------------------------------ HTTP, watched

    def _post(self, path: str, body: dict[str, Any] | None = None, params: dict[str, str] | None = None) -> None:
        """One route, raising with the server's own words on an error status."""
        r = self._http.post(path, json=body if body is not None else {}, params=params)
        if r.status_code >= 400:
            raise WeightSyncError(f"{self.base_url}{path} answered {r.status_code}: {r.text[:500]}")

    def _answers(self) -> str | None:
        """None if the server answers ``/health``; else why not."""
        try:
            r = self._probe.get("/health")
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if r.status_code == 200 else f"/health answered {r.status_code}"

    def _wait(self, future: concurrent.futures.Future[T], what: str) -> T:
        """``future``'s result, asking the server whether it is still there every ``STALL_PROBE_S``."""
        while True:
            try:
                return future.result(timeout=STALL_PROBE_S)
            except concurrent.futures.TimeoutError:
                why = self._answers()
                if why is not None:
                    raise WeightSyncError(f"{what}: the server at {self.base_url} stopped answering mid-push "
                                          f"({why}); push abandoned") from None

    def _call(self, path: str, body: dict[str, Any] | None = None, params: dict[str, str] | None = None) -> None:
        self._wait(_in_thread(lambda: self._post(path, body, params), f"vroll-native{path}"), path)

    # ------------------------------------------------------------------ the group

    def connect(self) -> None:
        """``/init_weight_transfer_engine`` and this trainer's end of the gloo group (rank 0), together."""
        self.close()
        cfg = self.config
        world = 1 + self.workers
        store = host_store(cfg.host, cfg.port, world, cfg.timeout_s)
        fields = GlooInitFields(cfg.host, store.port, world, 1, secrets.token_hex(8), cfg.timeout_s, True,
                                int(cfg.bucket_mb * 2**20))
        init = _in_thread(lambda: self._post("/init_weight_transfer_engine", {"init_info": asdict(fields)}),
                          "vroll-native-init")
        group = _in_thread(lambda: make_group(store, 0, world, "gloo", cfg.timeout_s, fields.session),
                           "vroll-native-group")
        self._wait(init, "/init_weight_transfer_engine")  # an init the server refused fails here, at once
        self.group = self._wait(group, "joining the weight-transfer group")

    def close(self) -> None:
        """Leave the group (the server keeps serving the last weights it loaded)."""
        if self.group is not None:
            self.group.close(self._in_flight)
            self.group = None
        self._in_flight = []

    def release(self) -> None:
        """The run's end: the workers leave the group too (``/shutdown_weight_transfer_engine``, best effort: a
        server that is gone has nothing to release), then this trainer."""
        if self.group is not None:
            try:
                self._probe.post("/shutdown_weight_transfer_engine", json={})
            except httpx.HTTPError as exc:
                log.warning("%s/shutdown_weight_transfer_engine: %s", self.base_url, exc)
        self.close()

    def shutdown(self) -> None:
        self.close()
        self._http.close()
        self._probe.close()

    # ------------------------------------------------------------------ one push

    def push(self, model: torch.nn.Module | ModelSource, version: int) -> SyncStats:
        """Send every weight, then label the served weights ``version``; see the module docstring."""
        source = model if isinstance(model, ModelSource) else ModelSource(model, self.dtype)
        if source.sharded:
            raise WeightSyncError("pushing a sharded model (ZeRO-3/FSDP2) to a stock vllm serve is not supported "
                                  "yet; use vroll serve, or train unsharded")
        bad = nonfinite_names(dict(unwrap(source.model).named_parameters()))
        if bad:  # checked before the server pauses: a diverged model is never pushed
            raise WeightSyncError(f"refusing to push non-finite weights: {bad[:5]}")
        if self.group is None:
            self.connect()
        start, times = time.perf_counter(), PhaseTimes()
        metas = source.metadata()
        try:
            self._call("/pause", params={"mode": "wait", "clear_cache": "true"})
            self._call("/start_weight_update")
            times.manifest_s = time.perf_counter() - start
            chunks = self._transfer(source, metas, times)
            t = time.perf_counter()
            self._call("/finish_weight_update")
            self._call("/update_weight_version", {"new_version": str(version)})
            times.load_s = time.perf_counter() - t
        except BaseException:
            self.close()  # the group may hold a broadcast no peer will finish: a fresh one next push
            raise
        self._call("/resume")
        nbytes = sum(m.nbytes for m in metas)
        return SyncStats(nbytes, len(metas), chunks, time.perf_counter() - start, version, times)

    def _transfer(self, source: ModelSource, metas: list[TensorMeta], times: PhaseTimes) -> int:
        """``/update_weights`` (a thread) while the packed buffers go out; returns how many buffers."""
        assert self.group is not None
        info = GlooUpdateFields([m.name for m in metas], [m.dtype for m in metas], [list(m.shape) for m in metas])
        update = _in_thread(lambda: self._post("/update_weights", {"update_info": asdict(info)}),
                            "vroll-native-update")
        chunks = packed_chunks(metas, int(self.config.bucket_mb * 2**20))
        with source.session():
            for chunk in chunks:
                if update.done():  # refused before its broadcast: say why instead of waiting on the group
                    update.result()
                t = time.perf_counter()
                with source.gather([m.name for m in chunk]) as tensors:
                    flat = torch.cat([tensors[m.name].contiguous().reshape(-1).view(torch.uint8) for m in chunk])
                times.pack_s += time.perf_counter() - t
                t = time.perf_counter()
                work = self.group.start_broadcast(flat)
                self._in_flight = [work]
                self._wait(_in_thread(work.wait, "vroll-native-broadcast"), "broadcasting weights")
                self._in_flight = []
                times.broadcast_s += time.perf_counter() - t
        t = time.perf_counter()
        self._wait(update, "/update_weights")
        times.barrier_s = time.perf_counter() - t
        return len(chunks)
