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
