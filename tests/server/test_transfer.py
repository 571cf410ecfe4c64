"""vLLM's weight-transfer protocol without an engine: the wire (TRL's sender against the workers'
receiver, two gloo ranks on vLLM's rendezvous) and the server's session rules (a fake
``submit_all`` records what would reach the replicas)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest
import torch

from vroll.launch import free_port
from vroll.protocol import (
    JobDone,
    JobFailed,
    TensorMeta,
    TransferCommitJob,
    TransferDropJob,
    TransferInitInfo,
    TransferInitJob,
    TransferReceiveJob,
    TransferUpdateInfo,
    WeightsCloseJob,
    WeightsInitRequest,
)
from vroll.server.errors import ApiError
from vroll.server.transfer import NativeTransfer
from vroll.server.weights import WeightSessions
from vroll.weightsync.buckets import dtype_name
from vroll.weightsync.group import host_store


@pytest.mark.parametrize("packed", [True, False])
def test_trls_packed_sender_and_the_workers_receiver_agree(packed):
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    from vroll.engine.native_transfer import GlooCommunicator, receive

    g = torch.Generator().manual_seed(0)
    sent = [(f"w{i}", torch.randn(3 + i, 5, generator=g).to(torch.bfloat16 if i % 2 else torch.float32))
            for i in range(7)]
    manifest = [TensorMeta(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in sent]
    port, buffer_bytes, got = free_port(), 200, {}

    def trainer() -> None:  # what TRL's client runs, with the CPU endpoint for NCCL's
        comm = GlooCommunicator.create("127.0.0.1", port, 0, 2, timeout_s=30)
        if not packed:
            for _, t in sent:
                comm.broadcast(t.clone(), src=0)
            return
        items = iter(sent)
        while (chunk := pack_tensors(items, lambda item: item[1], buffer_bytes)) is not None:
            comm.broadcast(chunk.packed_tensor, src=0)

    thread = threading.Thread(target=trainer)
    thread.start()
    worker = GlooCommunicator.create("127.0.0.1", port, 1, 2, timeout_s=30)
    got = {n: t.clone() for n, t in receive(worker, manifest, packed, buffer_bytes, torch.device("cpu"))}
    thread.join(30)
    assert list(got) == [n for n, _ in sent]
    assert all(torch.equal(got[n], t) for n, t in sent)


class Replicas:
    """Stands in for ``ReplicaPool.submit_all``: records jobs, answers each with ``reply``."""

    def __init__(self) -> None:
        self.jobs: list[object] = []
        self.reply: object = JobDone(1)

    def __call__(self, jobs: list) -> list[Future]:  # noqa: ANN001
        self.jobs += jobs
        futures = []
        for _ in jobs:
            fut: Future = Future()
            fut.set_result(self.reply)
            futures.append(fut)
        return futures


CHECKPOINT = {n: TensorMeta(n, "bfloat16", (4,)) for n in
              ("model.layers.0.a.weight", "model.layers.0.b.weight", "model.norm.weight")}


def update(*names: str, shape: tuple[int, ...] = (4,), dtype: str = "float32") -> TransferUpdateInfo:
    return TransferUpdateInfo(names=list(names), dtype_names=[dtype] * len(names), shapes=[list(shape)] * len(names))


async def _refusals_are_drained(ws: WeightSessions, sid: str, transfer: NativeTransfer, replicas: Replicas) -> None:
    """Each refused manifest is a 400 naming the tensor, and every replica drains its bytes (the sender
    is released) without staging them."""
    refused = [(update("model.nope"), "not a weight of the served model"),
               (update("model.norm.weight", shape=(5,)), "expects [4]"),
               (update("model.norm.weight", dtype="int32"), "floating-point"),
               (update("model.norm.weight", "model.norm.weight"), "sent twice")]
    replicas.jobs.clear()
    for bad, words in refused:
        with pytest.raises(ApiError, match=words.replace("[", "\\[")):
            await transfer.receive(ws, sid, bad, replicas)
    # every replica drained each refused update (the sender is released) and staged nothing
    assert [j.discard for j in replicas.jobs] == [True] * 2 * len(refused)
    assert [j.tensors for j in replicas.jobs[::2]] == [tuple(bad.tensors()) for bad, _ in refused]
    assert transfer.staged == {}
    replicas.jobs.clear()
    with pytest.raises(ApiError, match="unsupported dtype 'int3'"):  # no byte size: nothing to drain
        await transfer.receive(ws, sid, update("model.norm.weight", dtype="int3"), replicas)
    assert replicas.jobs == []


def test_one_trainer_holds_the_session_and_loads_whole_updates_at_finish():
    ws, replicas, transfer = WeightSessions(2, 1, "bfloat16", "cpu", CHECKPOINT), Replicas(), NativeTransfer()
    store = host_store("127.0.0.1", 0, 1, 30)
    info = TransferInitInfo(master_address="127.0.0.1", master_port=store.port, world_size=3, packed=True)

    async def run() -> str:
        with pytest.raises(ApiError, match="worker\\(s\\) after rank_offset 1 make 3"):
            await transfer.open(ws, info.model_copy(update={"world_size": 4}), replicas)
        session = await transfer.open(ws, info, replicas)
        assert [(j.rank_offset, j.world_size) for j in replicas.jobs] == [(1, 3), (2, 3)]
        sid = session.session_id
        for who, status in ((None, 403), ("guess", 403)):
            with pytest.raises(ApiError) as err:
                await transfer.start(ws, who, replicas)
            assert err.value.status == status and sid not in err.value.message
        with pytest.raises(ApiError, match="call /start_weight_update first"):
            await transfer.receive(ws, sid, update("model.norm.weight"), replicas)
        assert [j.discard for j in replicas.jobs[-2:]] == [True, True]  # the trainer's bytes are drained
        await transfer.start(ws, sid, replicas)
        await _refusals_are_drained(ws, sid, transfer, replicas)
        assert await transfer.receive(ws, sid, update("model.layers.0.a.weight"), replicas) == 16
        assert replicas.jobs == [TransferReceiveJob((TensorMeta("model.layers.0.a.weight", "float32", (4,)),),
                                                    True, info.packed_buffer_size_bytes)] * 2
        replicas.jobs.clear()
        with pytest.raises(ApiError, match="send whole layers") as err:  # b of layer 0 never came
            await transfer.finish(ws, sid, replicas)
        assert err.value.status == 400 and replicas.jobs == [TransferDropJob()] * 2
        await transfer.start(ws, sid, replicas)
        await transfer.receive(ws, sid, update("model.layers.0.a.weight", "model.layers.0.b.weight"), replicas)
        replicas.jobs.clear()
        assert await transfer.finish(ws, sid, replicas) == 1
        assert replicas.jobs == [TransferCommitJob()] * 2 and ws.weight_version == 1
        return sid

    sid = asyncio.run(run())
    transfer.replica_restarted(1)
    with pytest.raises(ApiError, match="replica 1 restarted") as err:
        asyncio.run(transfer.start(ws, sid, replicas))
    assert err.value.status == 409
    # vroll's own trainer cannot take a live session, and takes a dead one
    with pytest.raises(ApiError, match="another trainer is connected"):
        asyncio.run(ws.open(WeightsInitRequest(host="127.0.0.1", port=host_store("127.0.0.1", 0, 1, 30).port),
                            replicas))
    del store
    other = host_store("127.0.0.1", 0, 1, 30)
    replicas.jobs.clear()
    asyncio.run(ws.open(WeightsInitRequest(host="127.0.0.1", port=other.port), replicas))
    assert isinstance(replicas.jobs[0], WeightsCloseJob)
    with pytest.raises(ApiError, match="no weight-transfer session"):
        asyncio.run(transfer.start(ws, sid, replicas))


def test_a_failed_receive_or_join_is_a_409_and_nothing_stays_staged():
    ws, replicas, transfer = WeightSessions(1, 1, "bfloat16", "cpu", CHECKPOINT), Replicas(), NativeTransfer()
    store = host_store("127.0.0.1", 0, 1, 30)
    info = TransferInitInfo(master_address="127.0.0.1", master_port=store.port, world_size=2)
    replicas.reply = JobFailed(409, "TimeoutError: the trainer did not join")
    with pytest.raises(ApiError, match="could not join") as err:
        asyncio.run(transfer.open(ws, info, replicas))
    assert err.value.status == 409
    replicas.reply = JobDone(0)
    sid = asyncio.run(transfer.open(ws, info, replicas)).session_id
    assert isinstance(replicas.jobs[-1], TransferInitJob)
    asyncio.run(transfer.start(ws, sid, replicas))
    replicas.reply = JobFailed(409, "receive failed, previous weights kept: connection reset")
    with pytest.raises(ApiError, match="unchanged: receive failed") as err:
        asyncio.run(transfer.receive(ws, sid, update("model.norm.weight"), replicas))
    assert err.value.status == 409
    with pytest.raises(ApiError, match="call /start_weight_update first"):
        asyncio.run(transfer.finish(ws, sid, replicas))


def test_a_refused_update_the_workers_could_not_drain_ends_the_session():
    ws, replicas, transfer = WeightSessions(1, 1, "bfloat16", "cpu", CHECKPOINT), Replicas(), NativeTransfer()
    store = host_store("127.0.0.1", 0, 1, 30)
    info = TransferInitInfo(master_address="127.0.0.1", master_port=store.port, world_size=2)
    sid = asyncio.run(transfer.open(ws, info, replicas)).session_id
    asyncio.run(transfer.start(ws, sid, replicas))
    replicas.reply = JobFailed(409, "dropping a refused update failed: connection reset")
    with pytest.raises(ApiError, match="expects \\[4\\]") as err:  # the client still learns why it was refused
        asyncio.run(transfer.receive(ws, sid, update("model.norm.weight", shape=(5,)), replicas))
    assert err.value.status == 400
    replicas.reply = JobDone(0)
    with pytest.raises(ApiError, match="lost the trainer's group .* initialize the weight transfer again") as err:
        asyncio.run(transfer.start(ws, sid, replicas))
    assert err.value.status == 409
