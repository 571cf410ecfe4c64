"""``ServerPool``: several ``vroll serve`` servers as one generator (``--vllm_server_base_url a b ...``).

The trainer sees a :class:`~vroll.generation.generator.Generator`, as with one server; a pool holds one
:class:`~vroll.generation.server.ServerGenerator` per server (its client, its ``/info``, its weight
sender) and adds three things:

- Generation: a batch is split by prompts into contiguous ranges, one per server, sized in
  proportion to each server's data-parallel size (``/info``); the ranges go out at once (one
  thread per server) and come back in prompt order. Range ``[a, b)`` is sent with seed
  ``seed + first_index + a``, and a server seeds its prompt ``j`` with ``seed + j``: prompt ``i``
  is sampled with ``seed + first_index + i`` on whichever server it lands, so results do not
  depend on the split (nor on a server leaving: its range goes to the others, same seeds).
- Weight sync: :func:`vroll.weightsync.sender.push_all`: one process group per server, this
  trainer rank 0 of each, every bucket to every group before the next bucket (its docstring has
  the ordering). Atomicity is per server.
- Failure: a server that does not answer (connection lost, timeout, 502/503/504 after the
  client's retries) or fails its sync leaves the pool, with one warning naming it and why;
  its prompts go to the others. A 4xx is the caller's error and is raised, as with one server.
  A generation or a push that no server is left for is an error.
- Coming back: at each push, a server that left and now answers ``/health`` as ready (and serves
  the same model) is included in the push, through a new sync session; it rejoins the pool once
  it has taken the push, so it never samples with other weights than the pool's. One that fails
  to is tried again ``REJOIN_BACKOFF_S`` later.

Weight versions are the pool's: it starts at the first server's ``weight_version`` and counts
its pushes, and each server's own version is mapped to it (two servers pushed the same weights
may number them differently, e.g. one served an earlier run). A completion's version is the
pool version its server was serving; a server version the pool did not push nor find at start
(a replica restarted with its initial weights) is :data:`UNKNOWN_VERSION`, which async
generation counts as infinitely stale.

Threads: ``generate`` and ``push_weights`` hold one lock, so a push never overlaps a
generation. Async generation (``vroll.generation.async_generation``) relies on this order anyway:
its one producer thread calls ``generate`` and the main thread pushes only while the producer
is idle; the lock makes a misuse wait rather than mix weights within a batch.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from vroll.batching import UNKNOWN_VERSION, split_by_weight
from vroll.client import ServerError, ServerUnavailable, shifted
from vroll.generation.rollout import Rollout
from vroll.generation.server import ServerGenerator, sync_source
from vroll.protocol import GenerateResult, InfoResponse, PromptInput, SamplingSpec
from vroll.weightsync.sender import SyncStats, WeightSyncConfig, WeightSyncError, push_all

log = logging.getLogger(__name__)

REJOIN_BACKOFF_S = 60.0  # a server that answered /health but did not take a push is tried again after this
_DOWN_STATUSES = (502, 503, 504)  # the server (or a proxy before it) cannot serve: not the request's fault


class ServerPool:
    """Several ``vroll serve`` servers behind the :class:`~vroll.generation.generator.Generator` interface.

    Args:
        urls: the servers (at least two; one server is a ``ServerGenerator``).
        api_key, ready_timeout, sync: as for ``ServerGenerator``, the same for every server.
    """

    local = False

    def __init__(self, urls: Sequence[str], api_key: str | None, ready_timeout: float,
                 sync: WeightSyncConfig) -> None:
        self.servers: list[ServerGenerator] = []
        self._down: dict[int, str] = {}  # server index -> why it left
        self._retry_at: dict[int, float] = {}  # server index -> when it may try to rejoin (time.monotonic)
        self._threads: ThreadPoolExecutor | None = None
        self.lora_sync = "merged"  # as ServerGenerator's
        try:
            for url in urls:  # each waits until its server is ready
                self.servers.append(ServerGenerator(url, api_key, ready_timeout, sync))
            _check_same_model(self.servers)
        except BaseException:
            self.close()
            raise
        self.weight_version = self.servers[0].info.weight_version
        # per server: its weight_version -> the pool's (what it serves at start counts as the pool's start)
        self._versions = [{s.info.weight_version: self.weight_version} for s in self.servers]
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(len(self.servers), thread_name_prefix="vroll-pool")

    def live(self) -> list[int]:
        """Indices of the servers still in the pool."""
        return [i for i in range(len(self.servers)) if i not in self._down]

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout:
        start = time.perf_counter()
        with self._lock:
            parts = self._serve(prompts, sampling, first_index)
        merged = GenerateResult([r for out, _ in parts for r in out.results],
                                min((v for _, v in parts), default=self.weight_version))
        rollout = Rollout.from_results(merged, time.perf_counter() - start, prompts, sampling.return_logprobs)
        # each range was sampled with its own server's weights: per completion, that server's (pool) version
        rollout.weight_versions = [v for out, v in parts for r in out.results for _ in r.completions]
        return rollout

    def _serve(self, prompts: list[PromptInput], sampling: SamplingSpec,
               first_index: int) -> list[tuple[GenerateResult, int]]:
        """The results of every prompt, in prompt order, each range with the pool version that sampled it.

        Rounds: the prompts still to serve are split over the live servers and sent at once; the ranges
        of servers that fail go to the next round, over the servers left.
        """
        done: dict[int, tuple[GenerateResult, int]] = {}
        todo = [(0, len(prompts))] if prompts else []
        while todo:
            live = self.live()
            if not live:
                raise ServerUnavailable(f"no server of the pool is left to generate: {self._why_down()}")
            weights = [self.servers[i].info.data_parallel_size for i in live]
            jobs = [(i, a + lo, a + hi) for a, b in todo
                    for i, (lo, hi) in zip(live, split_by_weight(b - a, weights), strict=True) if hi > lo]
            assert self._threads is not None
            futures = [self._threads.submit(self.servers[i].client.generate, prompts[a:b],
                                            shifted(sampling, first_index + a)) for i, a, b in jobs]
            wait(futures)
            todo = []
            for (i, a, b), future in zip(jobs, futures, strict=True):
                try:
                    out = future.result()
                except ServerError as exc:
                    if exc.status not in _DOWN_STATUSES:
                        raise
                    self._leave(i, f"generation failed: {exc.reason}")
                    todo.append((a, b))
                else:
                    done[a] = (out, self._versions[i].get(out.weight_version, UNKNOWN_VERSION))
        return [done[a] for a in sorted(done)]

    def push_weights(self, model: torch.nn.Module) -> SyncStats:
        """Push to every live server (``push_all``), and to every server that left and is ready again,
        which rejoins once it took the push. A live server that fails leaves. Raises if none took it."""
        with self._lock:
            live, back = self.live(), self._returning()
            targets = live + back
            source = sync_source(model, self.lora_sync, self.servers[0].info.dtype)
            results = push_all([self.servers[i].sync for i in targets], source) if targets else []
            for i, result in zip(targets, results, strict=True):
                if isinstance(result, WeightSyncError) and i in back:
                    self._stay_out(i, f"did not take the push: {result}")
                elif isinstance(result, WeightSyncError):
                    self._leave(i, f"weight sync failed: {result}")
            took = [(i, r) for i, r in zip(targets, results, strict=True) if isinstance(r, SyncStats)]
            if not took:
                raise WeightSyncError(f"the weight push reached no server of the pool: {self._why_down()}")
            self.weight_version += 1
            for i, stats in took:
                self._versions[i][stats.weight_version] = self.weight_version
                if i in back:
                    self._rejoin(i)
            return dataclasses.replace(took[0][1], weight_version=self.weight_version)

    def _returning(self) -> list[int]:
        """Servers that left, are due for a try, answer ``/health`` as ready and serve the pool's model."""
        now, back = time.monotonic(), []
        reference = self.servers[(self.live() or [0])[0]].info
        for i in sorted(self._down):
            client = self.servers[i].client
            if self._retry_at.get(i, 0.0) > now or not client.is_ready():
                continue
            try:
                info = client.info()
            except ServerError:
                continue
            if _serving(info) != _serving(reference):
                self._stay_out(i, f"serves {_serving(info)}, the pool {_serving(reference)}")
                continue
            self.servers[i].info = info  # (a restarted server may have another data-parallel size)
            self._versions[i] = {}  # its versions count anew: it may have restarted
            back.append(i)
        return back

    def _rejoin(self, index: int) -> None:
        del self._down[index]
        self._retry_at.pop(index, None)
        log.warning("server pool: %s is back (ready, and took this push); %d of %d servers serve from now on",
                    self.servers[index].client.base_url, len(self.live()), len(self.servers))

    def _stay_out(self, index: int, why: str) -> None:
        self._retry_at[index] = time.monotonic() + REJOIN_BACKOFF_S
        self.servers[index].sync.abandon()
        log.info("server pool: %s answers again but stays out (%s); next try in %.0f s",
                 self.servers[index].client.base_url, why, REJOIN_BACKOFF_S)

    def metrics(self) -> dict[str, float]:
        """How many servers serve (logged with every step)."""
        return {"pool/servers_live": float(len(self.live())), "pool/servers": float(len(self.servers))}

    def _leave(self, index: int, why: str) -> None:
        self._down[index] = why
        self.servers[index].sync.abandon()  # its group is broken or its server gone: nothing to tell it
        log.warning("server pool: %s left the pool (%s); %d of %d servers serve from now on",
                    self.servers[index].client.base_url, why, len(self.live()), len(self.servers))

    def _why_down(self) -> str:
        return "; ".join(f"{self.servers[i].client.base_url}: {why}" for i, why in sorted(self._down.items()))

    def end_sync(self) -> None:
        """End every live server's sync session (they keep serving the last weights)."""
        for i in self.live():
            self.servers[i].end_sync()

    def close(self) -> None:
        for server in self.servers:
            server.close()  # (one that left has no sync session any more: only its client closes)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)


def _serving(info: InfoResponse) -> tuple:
    """What servers of one pool must agree on, or a batch would depend on its split."""
    return info.model, info.dtype, info.max_model_len, info.takes_images


def _check_same_model(servers: list[ServerGenerator]) -> None:
    first = _serving(servers[0].info)
    for s in servers[1:]:
        if _serving(s.info) != first:
            raise ValueError(f"the servers of a pool must serve the same model, dtype and context: "
                             f"{servers[0].client.base_url} serves {first}, {s.client.base_url} serves "
                             f"{_serving(s.info)}")
