"""What a weight push could cost on ONE GPU: the floors between two processes on the same device.

A trainer and a server sharing one GPU have three ways to move a model between them; this
times each for ``--mb`` MiB (default: a Qwen2.5-1.5B's bf16 weights) and writes one JSON:

- ``nccl``: a broadcast over NCCL between two ranks on the same GPU. NCCL normally refuses
  (``Duplicate GPU detected``); the error is recorded as the result then.
- ``cuda_ipc``: the receiver maps the sender's buffer (CUDA IPC, ``torch.multiprocessing``) and
  copies it device to device: the hardware floor of a same-GPU push.
- ``gloo``: what vroll's push does on one GPU today: device to pinned host, a gloo broadcast over
  loopback, pinned host to device, each timed (``d2h_s``, ``broadcast_s``, ``h2d_s``).

    python benchmarks/gpu/push_floor.py --out /tmp/push_floor.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from vroll.weightsync.group import host_store, join_store, make_group

TIMEOUT_S = 60.0  # a group that cannot form fails within this


def _sync() -> None:
    torch.cuda.synchronize()


def _receiver(kind: str, port: int, numel: int, rounds: int, queue: Any) -> None:
    """Spawned: rank 1 of the ``kind`` measurement, on the same GPU as rank 0."""
    torch.cuda.set_device(0)
    try:
        group = make_group(join_store("127.0.0.1", port, 2, TIMEOUT_S), 1, 2, kind, TIMEOUT_S, kind)
        buf = torch.empty(numel, dtype=torch.bfloat16, device=group.device, pin_memory=kind == "gloo")
        on_gpu = torch.empty(numel, dtype=torch.bfloat16, device="cuda")
        for _ in range(rounds):
            group.broadcast(buf, src=0)
            if kind == "gloo":
                start = time.perf_counter()
                on_gpu.copy_(buf)
                _sync()
                queue.put(("h2d_s", time.perf_counter() - start))
            group.all_ok(True)
        group.close()
    except Exception as exc:  # noqa: BLE001 - reported, not raised: NCCL refusing one GPU is a result
        queue.put(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def group_floor(kind: str, numel: int, rounds: int) -> dict[str, Any]:
    """Rank 0 here, rank 1 spawned, both on GPU 0; broadcasts of ``numel`` bf16 values."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = host_store("127.0.0.1", 0, 2, TIMEOUT_S)
    proc = ctx.Process(target=_receiver, args=(kind, store.port, numel, rounds, queue))
    proc.start()
    out: dict[str, Any] = {"backend": kind, "bytes": numel * 2}
    try:
        group = make_group(store, 0, 2, kind, TIMEOUT_S, kind)
        src = torch.ones(numel, dtype=torch.bfloat16, device="cuda")
        host = torch.empty(numel, dtype=torch.bfloat16, pin_memory=True)
        rows = []
        for _ in range(rounds):
            start = time.perf_counter()
            if kind == "gloo":
                host.copy_(src)
                _sync()
            mark = time.perf_counter()
            group.broadcast(host if kind == "gloo" else src, src=0)
            group.all_ok(True)
            rows.append({"total_s": time.perf_counter() - start, "d2h_s": mark - start,
                         "broadcast_s": time.perf_counter() - mark})
        group.close()
        out |= {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0]}
        out["gb_per_s"] = numel * 2 / out["total_s"] / 1e9
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    proc.join(TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
    h2d = []
    while not queue.empty():
        key, value = queue.get()
        if key == "h2d_s":
            h2d.append(value)
        else:
            out["receiver_error"] = value
    if len(h2d) > 1:
        out["h2d_s"] = statistics.median(h2d[1:])  # the receiver's copy to its GPU (the worker's load does it)
    return out


def _ipc_receiver(queue: Any, done: Any, rounds: int) -> None:
    torch.cuda.set_device(0)
    shared = queue.get()  # the sender's buffer, mapped through CUDA IPC
    mine = torch.empty_like(shared)
    for _ in range(rounds):
        start = time.perf_counter()
        mine.copy_(shared)
        _sync()
        done.put(time.perf_counter() - start)
    del shared


def ipc_floor(numel: int, rounds: int) -> dict[str, Any]:
    """Device-to-device copy of the sender's buffer by another process (CUDA IPC)."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Queue()
    src = torch.ones(numel, dtype=torch.bfloat16, device="cuda")
    proc = ctx.Process(target=_ipc_receiver, args=(queue, done, rounds))
    proc.start()
    queue.put(src)
    seconds = [done.get(timeout=TIMEOUT_S) for _ in range(rounds)]
    proc.join(TIMEOUT_S)
    med = statistics.median(seconds[1:])
    return {"bytes": numel * 2, "copy_s": med, "gb_per_s": numel * 2 / med / 1e9, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=2944.0, help="MiB per transfer (Qwen2.5-1.5B in bf16: ~2944)")
    p.add_argument("--rounds", type=int, default=4, help="transfers per floor; the first is left out")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    numel = int(args.mb * 2**20) // 2
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "mib": args.mb,
              "nccl_version": ".".join(map(str, torch.cuda.nccl.version()))}
    for name, fn in [("cuda_ipc", lambda: ipc_floor(numel, args.rounds)),
                     ("nccl", lambda: group_floor("nccl", numel, args.rounds)),
                     ("gloo", lambda: group_floor("gloo", numel, args.rounds))]:
        start = time.perf_counter()
        result[name] = fn()
        print(f"{name} ({time.perf_counter() - start:.0f} s): {json.dumps(result[name])[:400]}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
