"""vLLM's weight-transfer protocol on the worker side, as TRL 1.16's ``VLLMClient`` speaks it.

The trainer is rank 0 of a group it hosts through vLLM's ``StatelessProcessGroup`` (a TCP
store at ``master_address:master_port``); every worker of every replica joins as rank
``rank_offset + r*T + t``. On GPU the data plane is vLLM's ``PyNcclCommunicator`` over that
store, exactly what the trainer builds with ``nccl_common.trainer_init``; on CPU (no NCCL) it is
:class:`GlooCommunicator`, a gloo group on the same store, which a CPU trainer builds the same
way (``GlooCommunicator.create(..., rank=0)``). One ``/update_weights`` is the tensors in its
manifest broadcast from rank 0: packed (vLLM's ``packed_nccl_broadcast_producer``: raw bytes in
uint8 buffers cut after ``packed_buffer_size_bytes``, see ``vroll.weightsync.buckets.packed_chunks``)
or one broadcast per tensor.

Received tensors are staged, cast to the serving dtype, and loaded only at
``/finish_weight_update`` (:meth:`NativeTransferMixin.vroll_native_commit`), through the same
loader as vroll's own sync: so a trainer that dies mid-update leaves the served weights untouched,
and a generation never sees half an update.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vroll.protocol import ReceiveResult, TensorMeta
from vroll.weightsync.buckets import packed_chunks, to_dtype, unpack_bytes
from vroll.weightsync.group import JOIN_TIMEOUT_S

GLOO_PREFIX = "vroll-gloo"  # the gloo group's keys in the trainer's store (vLLM's own keys stay apart)


@dataclass
class GlooCommunicator:
    """The CPU stand-in for ``PyNcclCommunicator``: ``broadcast(tensor, src)`` over gloo.

    ``group`` is the ``StatelessProcessGroup`` (TRL's ``close_communicator`` clears its store).
    """

    group: Any
    pg: dist.ProcessGroup

    @classmethod
    def create(cls, host: str, port: int, rank: int, world_size: int, timeout_s: float,
               store_timeout_s: float = 300.0) -> GlooCommunicator:
        """Join (rank > 0) or host (rank 0) the rendezvous at ``host:port``; blocks until every rank is in."""
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                             store_timeout=int(store_timeout_s))
        store = dist.PrefixStore(GLOO_PREFIX, group.store)
        return cls(group, dist.ProcessGroupGloo(store, rank, world_size, datetime.timedelta(seconds=timeout_s)))

    def broadcast(self, tensor: torch.Tensor, src: int, stream: Any = None) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()
        return tensor


def _nccl_communicator(host: str, port: int, rank: int, world_size: int, store_timeout_s: float) -> Any:
    """What ``nccl_common.worker_init_process_group`` builds (vLLM 0.22 and 0.32 alike)."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    try:  # vLLM >= 0.28 keeps NCCL's env pinning out of this group; older releases have no such helper
        from vllm.utils.nccl import unpinned_nccl_env
    except ImportError:
        unpinned_nccl_env = contextlib.nullcontext
    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                         store_timeout=int(store_timeout_s))
    with unpinned_nccl_env():
        return PyNcclCommunicator(group, device=torch.cuda.current_device())


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def receive(comm: Any, tensors: Sequence[TensorMeta], packed: bool, buffer_bytes: int,
            device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one update, as the trainer broadcasts them (views of the receive buffers)."""
    if not packed:
        for meta in tensors:
            out = torch.empty(meta.shape, dtype=to_dtype(meta.dtype), device=device)
            comm.broadcast(out, src=0)
            yield meta.name, out
        return
    for chunk in packed_chunks(tensors, buffer_bytes):
        flat = torch.empty(sum(m.nbytes for m in chunk), dtype=torch.uint8, device=device)
        comm.broadcast(flat, src=0)
        yield from unpack_bytes(chunk, flat)


class NativeTransferMixin:
    """Worker methods for the native protocol (attributes live on the vLLM ``Worker``).

    Needs ``_load(weights)`` from the class it is mixed into (``WeightSyncExtension``).
    """

    _vroll_native: Any = None
    _vroll_staged: list[tuple[str, torch.Tensor]] | None = None

    def vroll_native_init(self, host: str, port: int, world_size: int, rank_offset: int, timeout_s: float) -> int:
        """Join the trainer's group as rank ``rank_offset + tp_rank``; returns that rank.

        Bounded by ``JOIN_TIMEOUT_S`` (the server probed the trainer's store first): the replica
        serves generation between jobs, so a trainer that vanished must not hold it.
        """
        self.vroll_native_close()
        rank = rank_offset + self.rank  # type: ignore[attr-defined]
        wait = min(timeout_s, JOIN_TIMEOUT_S)
        if torch.cuda.is_available():
            self._vroll_native = _nccl_communicator(host, port, rank, world_size, wait)
        else:
            self._vroll_native = GlooCommunicator.create(host, port, rank, world_size, timeout_s, wait)
        return rank

    def vroll_native_close(self) -> None:
        """Leave the trainer's group and forget anything staged (idempotent)."""
        self._vroll_native = None
        self._vroll_staged = None

    def vroll_native_receive(self, names: list[str], dtypes: list[str], shapes: list[list[int]], packed: bool,
                             buffer_bytes: int, discard: bool = False) -> ReceiveResult:
        """Receive one ``/update_weights`` into the staging area, cast to the serving dtype; with
        ``discard``, take a refused update off the wire and keep nothing (one buffer in memory at a time)."""
        if self._vroll_native is None:
            return ReceiveResult(False, True, "no weight-transfer group: call /init_weight_transfer_engine first")
        metas = [TensorMeta(n, d, tuple(s)) for n, d, s in zip(names, dtypes, shapes, strict=True)]
        if discard:
            return self._vroll_native_discard(metas, packed, buffer_bytes)
        serving = self.model_config.dtype  # type: ignore[attr-defined]
        device = _device()
        staged = self._vroll_staged if self._vroll_staged is not None else []
        try:
            for name, tensor in receive(self._vroll_native, metas, packed, buffer_bytes, device):
                staged.append((name, tensor.to(serving, copy=True)))  # a copy: the buffer goes at once
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except Exception as exc:  # the trainer died or timed out: nothing was loaded
            self.vroll_native_close()
            return ReceiveResult(False, True, f"receive failed, previous weights kept: {exc}")
        self._vroll_staged = staged
        return ReceiveResult(True, True)

    def _vroll_native_discard(self, metas: list[TensorMeta], packed: bool, buffer_bytes: int) -> ReceiveResult:
        device = _device()
        try:
            for _ in receive(self._vroll_native, metas, packed, buffer_bytes, device):
                pass
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except Exception as exc:
            self.vroll_native_close()
            return ReceiveResult(False, True, f"dropping a refused update failed: {exc}")
        return ReceiveResult(True, True)

    def vroll_native_commit(self) -> ReceiveResult:
        """Load everything staged since the last commit, through vroll's loader."""
        staged, self._vroll_staged = self._vroll_staged or [], None
        if not staged:
            return ReceiveResult(True, True)
        try:
            self._load(iter(staged))  # type: ignore[attr-defined]
        except Exception as exc:
            return ReceiveResult(False, False, f"loading received weights failed: {exc}")
        return ReceiveResult(True, True)

    def vroll_native_drop(self) -> None:
        """Forget what is staged (the group stays)."""
        self._vroll_staged = None
