"""The trainer <-> workers process group, built without touching the default group.

The trainer already has a default process group (accelerate/DDP) and every vLLM
worker has its own (tensor parallelism), so the weight-sync group is a separate,
stateless one: the trainer hosts a ``TCPStore`` and every worker of every replica
connects to it. Rank 0 is always the trainer; replica ``r``'s tensor-parallel worker
``t`` is rank ``1 + r * T + t``.

A worker serves generation between jobs, so its join is bounded by ``join_timeout_s``
(connecting to the store, then waiting for the trainer's "here" key): a trainer that
died after ``/weights/init`` costs the replicas those seconds, never ``timeout_s``.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

JOIN_TIMEOUT_S = 10.0  # a worker waits this long for a trainer that passed the server's probe
_TRAINER_KEY = "trainer-here"


@dataclass
class SyncGroup:
    """A process group plus what is needed to use and close it."""

    pg: dist.ProcessGroup
    store: dist.Store
    rank: int
    world_size: int
    backend: str
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Broadcast ``tensor`` in place from ``src`` to every rank (blocking)."""
        self.start_broadcast(tensor, src).wait()

    def start_broadcast(self, tensor: torch.Tensor, src: int = 0) -> dist.Work:
        """Start the broadcast and return its handle: a trainer feeding several groups (one per server)
        starts one in each, then waits for each, so they move at once (gloo: its own threads; NCCL: each
        group's own stream)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        return self.pg.broadcast([tensor], opts)

    def all_ok(self, ok: bool) -> bool:
        """A barrier that also tells every rank whether all ranks succeeded."""
        work, flag = self.start_all_ok(ok)
        work.wait()
        return bool(flag.item())

    def start_all_ok(self, ok: bool) -> tuple[dist.Work, torch.Tensor]:
        """:meth:`all_ok` started: its handle, and the flag that holds the answer once it completed."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        return self.pg.allreduce([flag], opts), flag

    def close(self, in_flight: Sequence[dist.Work] = ()) -> None:
        """Drop the group; peers see a closed connection, not a hang.

        ``in_flight``: operations that never completed (a peer died in them). NCCL aborts them.
        A gloo operation blocked on a dead peer ends only at the group's timeout, and dropping the
        group joins its threads, i.e. waits that long: a daemon thread holds both until then.
        """
        abort = getattr(self.pg, "abort", None)
        if self.backend == "nccl" and callable(abort):
            abort()
        elif in_flight:
            threading.Thread(target=_outlive, args=(self.pg, list(in_flight)), name="vroll-sync-drain",
                             daemon=True).start()
        self.pg = None  # type: ignore[assignment]
        self.store = None  # type: ignore[assignment]


def _outlive(pg: dist.ProcessGroup, works: list[dist.Work]) -> None:
    """Hold an abandoned group until its operations end (they fail at the group's timeout)."""
    for work in works:
        try:
            work.wait()
        except RuntimeError:
            pass  # expected: the peer is gone
    del pg


PROBE_THREAD = "vroll-store-connect"  # the name of the threads _bounded starts (a server counts those left)


def _bounded(fn: Callable[[], T], seconds: float, what: str) -> T:
    """``fn()`` in a daemon thread, given up after ``seconds``.

    A ``TCPStore`` client blocks forever on a port that accepts connections but does
    not speak the store's protocol; this bounds that wait (the thread ends when the
    peer closes the connection).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=run, name=PROBE_THREAD, daemon=True)
    thread.start()
    thread.join(seconds)
    if error:
        raise error[0]
    if not result:
        raise TimeoutError(f"{what}: no answer within {seconds:g} s")
    return result[0]


def host_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The trainer's rendezvous store; ``port=0`` picks a free port (see ``.port``)."""
    return dist.TCPStore(
        host, port, world_size, True,
        timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
    )


def join_store(host: str, port: int, world_size: int, timeout_s: float,
               connect_timeout_s: float = JOIN_TIMEOUT_S) -> dist.TCPStore:
    """A worker's connection to the trainer's store (the connect is bounded by ``connect_timeout_s``)."""
    wait = min(timeout_s, connect_timeout_s)
    store = _bounded(
        lambda: dist.TCPStore(host, port, world_size, False, timeout=datetime.timedelta(seconds=wait),
                              wait_for_workers=False),
        wait + 1.0, f"the trainer's rendezvous at {host}:{port}")
    store.set_timeout(datetime.timedelta(seconds=timeout_s))  # later waits: other replicas may be busy
    return store


def store_answers(host: str, port: int, timeout_s: float) -> bool:
    """Whether a rendezvous store answers at ``host:port`` within ``timeout_s``.

    A closed port, a filtered one and an open port that is not a store all read
    False after about ``timeout_s`` (the client retries refused connections until
    then), so the answer says no more than "a trainer is there or not".
    """
    try:
        _bounded(lambda: dist.TCPStore(host, port, 1, False, timeout=datetime.timedelta(seconds=timeout_s),
                                       wait_for_workers=False),
                 timeout_s + 0.5, "probe")
    except Exception:  # noqa: BLE001 - any failure means "no trainer there"
        return False
    return True


def make_group(
    store: dist.Store, rank: int, world_size: int, backend: str, timeout_s: float, session: str,
    join_timeout_s: float | None = None,
) -> SyncGroup:
    """Create the gloo or NCCL group for one trainer session (``session`` scopes keys).

    Rank 0 (the trainer) announces itself first; other ranks wait at most
    ``join_timeout_s`` (default ``timeout_s``) for it before building the group.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = dist.PrefixStore(f"vroll/{session}", store)
    if rank == 0:
        prefixed.set(_TRAINER_KEY, "1")
    else:
        wait = timeout_s if join_timeout_s is None else min(timeout_s, join_timeout_s)
        try:
            prefixed.wait([_TRAINER_KEY], datetime.timedelta(seconds=wait))
        except Exception as exc:  # noqa: BLE001 - a timeout or a closed store: the trainer is gone
            raise TimeoutError(f"the trainer did not join its weight-sync group within {wait:g} s "
                               f"({type(exc).__name__})") from None
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        device = torch.device("cpu")
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise ValueError(f"unknown weight-sync backend {backend!r}: use 'nccl' or 'gloo'")
    return SyncGroup(pg, store, rank, world_size, backend, device)
