"""The server's weight-sync bookkeeping without an engine: the checkpoint it checks
plans against, and the session rules (a fake ``submit_all`` records what would reach
the replicas)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from concurrent.futures import Future

import pytest

from helpers import wait_for
from vroll.launch import free_port
from vroll.protocol import Bucket, JobDone, TensorMeta, WeightsInitJob, WeightsInitRequest
from vroll.server.checkpoint import checkpoint_tensors
from vroll.server.errors import ApiError
from vroll.server.weights import PROBE_TIMEOUT_S, WeightSessions
from vroll.weightsync.group import PROBE_THREAD, host_store


def test_checkpoint_tensors_reads_headers(model_path):
    tensors = checkpoint_tensors(model_path)
    assert tensors is not None
    assert tensors["model.embed_tokens.weight"] == TensorMeta("model.embed_tokens.weight", "bfloat16", (49152, 576))
    assert "lm_head.weight" not in tensors  # tied to the embeddings
    assert checkpoint_tensors("no/such-model-anywhere") is None


def sessions(checkpoint: dict[str, TensorMeta] | None = None) -> WeightSessions:
    return WeightSessions(dp=2, tp=1, dtype="bfloat16", device="cpu", checkpoint=checkpoint)


class Replicas:
    """Stands in for ``ReplicaPool.submit_all``: records jobs, answers them at once."""

    def __init__(self) -> None:
        self.jobs: list[object] = []

    def __call__(self, jobs: list) -> list[Future]:  # noqa: ANN001
        self.jobs += jobs
        futures = []
        for _ in jobs:
            fut: Future = Future()
            fut.set_result(JobDone(0))
            futures.append(fut)
        return futures


def test_a_non_float_checkpoint_tensor_is_never_overwritten():
    ws = sessions({"model.norm.weight": TensorMeta("model.norm.weight", "bfloat16", (4,)),
                   "model.q.qweight": TensorMeta("model.q.qweight", "int32", (4, 2))})
    ws.validate([Bucket("bfloat16", (TensorMeta("model.norm.weight", "bfloat16", (4,)),))])
    with pytest.raises(ApiError, match="is int32 in the served checkpoint") as err:
        ws.validate([Bucket("bfloat16", (TensorMeta("model.q.qweight", "bfloat16", (4, 2)),))])
    assert err.value.status == 400


def test_init_checks_the_request_and_the_rendezvous_before_any_replica_hears_of_it():
    ws, replicas = sessions(), Replicas()

    def refused(req: WeightsInitRequest) -> ApiError:
        with pytest.raises(ApiError) as err:
            asyncio.run(ws.open(req, replicas))
        return err.value

    for timeout in (0.0, 0.99, 600.5, float("inf"), float("nan")):
        err = refused(WeightsInitRequest(host="127.0.0.1", port=free_port(), timeout_s=timeout))
        assert err.status == 400 and "timeout_s must be in 1..600" in err.message
    err = refused(WeightsInitRequest(host="127.0.0.1", port=free_port()))
    assert err.status == 400 and "no weight-sync rendezvous answered" in err.message
    assert replicas.jobs == [] and ws.session is None

    store = host_store("127.0.0.1", 0, 1, 30)
    session = asyncio.run(ws.open(WeightsInitRequest(host="127.0.0.1", port=store.port), replicas))
    assert [type(j) for j in replicas.jobs] == [WeightsInitJob, WeightsInitJob]
    assert len(session.session_id) >= 32
    other = host_store("127.0.0.1", 0, 1, 30)
    err = refused(WeightsInitRequest(host="127.0.0.1", port=other.port))  # the first store still answers
    assert err.status == 409 and session.session_id not in err.message
    with pytest.raises(ApiError) as wrong:
        asyncio.run(ws.close("not-the-id", replicas))
    assert wrong.value.status == 403 and session.session_id not in wrong.value.message
    del store  # the first trainer dies: the next init replaces its session without force
    again = asyncio.run(ws.open(WeightsInitRequest(host="127.0.0.1", port=other.port), replicas))
    assert again.session_id != session.session_id


async def _open_all(ws: WeightSessions, ports: list[int]) -> list[tuple[int, float]]:
    """Concurrent inits: (status, seconds) of each refusal."""
    async def one(port: int) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            await ws.open(WeightsInitRequest(host="127.0.0.1", port=port), Replicas())
        except ApiError as err:
            return err.status, time.monotonic() - t0
        return 200, time.monotonic() - t0
    return await asyncio.gather(*(one(p) for p in ports))


def test_concurrent_inits_probe_at_once_and_silent_ports_are_bounded():
    """Four inits naming dead ports are answered together, one probe each (they queued: 3.5, 7, 10.5, 14 s).
    A port that accepts and never answers holds its probe's thread until it closes: past the cap, a 503."""
    answers = asyncio.run(_open_all(sessions(), [free_port() for _ in range(4)]))
    assert [status for status, _ in answers] == [400] * 4
    assert max(s for _, s in answers) < 2 * PROBE_TIMEOUT_S, answers  # one probe's time, not four

    def probe_threads() -> int:
        return sum(t.name == PROBE_THREAD for t in threading.enumerate())

    assert wait_for(lambda: probe_threads() == 0, timeout=10)  # a refused port's probe ends by its own timeout
    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # accepts (the backlog), never answers
    try:
        ws = sessions()
        ws.max_pending_probes = 2
        answers = asyncio.run(_open_all(ws, [s.getsockname()[1] for s in silent]))
        assert [status for status, _ in answers] == [400, 400]
        [(status, _)] = asyncio.run(_open_all(ws, [free_port()]))
        assert status == 503  # two threads still wait on the silent ports
    finally:
        for s in silent:
            s.close()
    assert wait_for(lambda: probe_threads() == 0, timeout=30)
    [(status, _)] = asyncio.run(_open_all(ws, [free_port()]))
    assert status == 400  # the ports closed, their threads ended: probes are taken again
