"""The trainer <-> workers process group, built without touching the default group.

The trainer already has a default process group (accelerate/DDP) and every vLLM
worker has its own (tensor parallelism), so the weight-sync group is a separate,
stateless one: the trainer hosts a ``TCPStore`` and every worker of every replica
connects to it. Rank 0 is always the trainer; replica ``r``'s tensor-parallel worker
``t`` is rank ``1 + r * T + t``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()

    def all_ok(self, ok: bool) -> bool:
        """A barrier that also tells every rank whether all ranks succeeded."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([flag], opts).wait()
        return bool(flag.item())

    def close(self) -> None:
        """Drop the group; in-flight peers see a closed connection, not a hang."""
        abort = getattr(self.pg, "abort", None)
        if self.backend == "nccl" and callable(abort):
            abort()
        self.pg = None  # type: ignore[assignment]
        self.store = None  # type: ignore[assignment]


def host_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The trainer's rendezvous store; ``port=0`` picks a free port (see ``.port``)."""
    return dist.TCPStore(
        host, port, world_size, True,
        timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
    )


def join_store(host: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """A worker's connection to the trainer's store."""
    return dist.TCPStore(host, port, world_size, False, timeout=datetime.timedelta(seconds=timeout_s))


def make_group(
    store: dist.Store, rank: int, world_size: int, backend: str, timeout_s: float, session: str
) -> SyncGroup:
    """Create the gloo or NCCL group for one trainer session (``session`` scopes keys)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = dist.PrefixStore(f"vroll/{session}", store)
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
