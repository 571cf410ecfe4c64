"""A real gloo group across processes: the transport weight sync stands on."""

import multiprocessing as mp
import os

import torch

from vroll.weightsync.group import host_store, join_store, make_group


def _receiver(port: int, rank: int, world: int, out: mp.Queue) -> None:
    group = make_group(join_store("127.0.0.1", port, world, 30), rank, world, "gloo", 30, "t")
    buf = torch.empty(5, dtype=torch.bfloat16)
    group.broadcast(buf)
    ok = group.all_ok(True)
    try:
        group.broadcast(buf)  # the sender dies instead of sending: must error, not hang
        out.put((rank, buf.tolist(), ok, "no error"))
    except Exception as exc:  # noqa: BLE001
        out.put((rank, buf.tolist(), ok, type(exc).__name__))


def _dying_sender(port: int, world: int) -> None:
    store = host_store("127.0.0.1", port, world, 30)
    group = make_group(store, 0, world, "gloo", 30, "t")
    group.broadcast(torch.arange(5, dtype=torch.bfloat16))
    group.all_ok(True)
    os._exit(0)


def test_broadcast_barrier_and_a_dead_sender_is_an_error_not_a_hang():
    ctx = mp.get_context("spawn")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = ctx.Queue()
    sender = ctx.Process(target=_dying_sender, args=(port, 3))
    sender.start()
    receivers = [ctx.Process(target=_receiver, args=(port, r, 3, out)) for r in (1, 2)]
    for p in receivers:
        p.start()
    results = sorted(out.get(timeout=60) for _ in receivers)
    for p in [sender, *receivers]:
        p.join(30)
    assert [r[0] for r in results] == [1, 2]
    for _, values, ok, error in results:
        assert values == [0.0, 1.0, 2.0, 3.0, 4.0] and ok is True
        assert error == "RuntimeError"


def _free_port() -> int:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_only_a_live_store_answers_the_probe_and_every_no_is_bounded():
    import socket
    import time

    from vroll.weightsync.group import store_answers

    store = host_store("127.0.0.1", 0, 1, 30)
    assert store_answers("127.0.0.1", store.port, 2.0)
    with socket.socket() as mute:  # accepts connections but speaks no store protocol
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        for port in (_free_port(), mute.getsockname()[1]):
            start = time.monotonic()
            assert not store_answers("127.0.0.1", port, 1.0)
            assert time.monotonic() - start < 3.0


def test_a_worker_gives_up_on_a_trainer_that_never_joins():
    import time

    import pytest

    store = host_store("127.0.0.1", 0, 2, 60)
    worker = join_store("127.0.0.1", store.port, 2, 60, connect_timeout_s=2.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not join"):
        make_group(worker, 1, 2, "gloo", 60, "s", join_timeout_s=1.0)  # rank 0 never comes
    assert time.monotonic() - start < 5.0
    with pytest.raises(TimeoutError):  # a port that is not a store: bounded, not a hang
        import socket

        with socket.socket() as mute:
            mute.bind(("127.0.0.1", 0))
            mute.listen(8)
            join_store("127.0.0.1", mute.getsockname()[1], 2, 60, connect_timeout_s=1.0)
