"""GPU smoke benchmark: generation through ``vroll serve`` vs in-process, and one weight sync.

For one model folder (``make_model.py``), on one GPU (or ``--data-parallel-size`` x
``--tensor-parallel-size`` GPUs):

- ``server``: generated tokens/s for ``--prompts`` prompts x ``--max-tokens`` tokens
  (``ignore_eos``: every run generates exactly that many) through
  ``GenerationClient.generate`` -> HTTP -> ``vroll serve`` (``--data-parallel-size``
  replicas of ``--tensor-parallel-size`` GPUs each), timed by the client;
- ``pool``: the same batch sent to a replica process by ``ReplicaPool`` (the server's own
  replica machinery: spawned process, pipe, job loop) with no HTTP in between, timed
  from submit to reply; server minus pool is what FastAPI/JSON/httpx cost;
- ``inproc``: the same batch through ``VLLMEngine`` in its own process, built from the
  ``EngineSpec`` that ``vroll serve`` builds from the same flags, timed around
  ``generate`` inside that process (no HTTP, no pipe);
- ``sync``: a full weight sync of the model over gloo into the server (every worker of
  every replica), from a trainer model that lives on the first GPU (shared with the
  engines: NCCL cannot put two ranks on one device), seconds and GB/s as
  ``WeightSyncClient.push`` reports them (plan + HTTP + pack on the CPU + broadcast +
  vLLM's layerwise reload + prefix-cache reset).

``pool`` and ``inproc`` are one engine of ``--tensor-parallel-size`` GPUs (the first
ones visible): data parallelism applies to the server only, so the in-process baseline
is TP only, and with ``--data-parallel-size`` > 1 the ``*_overhead_pct`` figures
compare the server's replicas with one engine (use ``--modes server`` there).

All engines are up at once (each with ``--gpu-memory-utilization``, 0.25 by default:
far more KV cache than the batch needs) and the timed runs alternate between them, so
drift (clocks, caches, other work on the machine) hits every mode alike; ``--sequential``
runs each mode alone instead. Each mode is warmed up once, then timed ``--repeats``
times; the median is reported. ``*_1tok`` rows time the same prompts with
``max_tokens=1``: the fixed cost of one call without the decode loop.

    python benchmarks/gpu/bench_gpu.py --model /tmp/qwen05b --out gpu_smoke.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOPICS = ["a lighthouse", "a dragon", "the moon", "a small robot", "a lost key", "an old map", "a storm",
          "a violin", "a desert", "a library", "a fox", "a train", "a garden", "a clock", "a river", "a kite"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder (make_model.py)")
    p.add_argument("--out", required=True, type=Path, help="JSON results path")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed generations per mode (median)")
    p.add_argument("--sync-repeats", type=int, default=3, help="timed syncs after the first (median)")
    p.add_argument("--bucket-mb", type=float, default=512.0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.25, help="per engine")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (server, pool, inproc)")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="server replicas (server only: pool and inproc stay one engine)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--modes", default="server,pool,inproc", help="comma list of server, pool, inproc")
    p.add_argument("--sequential", action="store_true", help="one engine at a time (no alternation)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes) - {"server", "pool", "inproc"} or "server" not in args.modes:
        p.error(f"--modes must include server and only server, pool, inproc (got {args.modes})")
    return args


def prompt_ids(model: str, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i}):" for i in range(count)]
    return [tok(t).input_ids for t in texts]


def serve_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--model", args.model, "--gpu-memory-utilization", str(args.gpu_memory_utilization),
             "--max-model-len", str(args.max_model_len), "--tensor-parallel-size", str(args.tensor_parallel_size),
             "--data-parallel-size", str(args.data_parallel_size)]
    return flags + (["--enforce-eager"] if args.enforce_eager else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gen_stats(times: list[float], tokens: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {"seconds": [round(t, 4) for t in times], "median_s": round(med, 4),
            "tokens": tokens, "tokens_per_s": round(tokens / med, 1)}


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, Any, float]:
    import torch

    from vroll.client import GenerationClient

    port = _free_port()
    log = args.out.with_name("bench_server.log")
    cmd = [sys.executable, "-m", "vroll", "serve", "--port", str(port), *serve_flags(args)]
    if not torch.cuda.is_available():
        cmd += ["--kv-cache-memory-gib", "0.5"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    client = GenerationClient(f"http://127.0.0.1:{port}", timeout=1800)
    try:
        client.wait_until_ready(timeout=900)
    except BaseException:
        stop_server(proc)
        raise
    return proc, client, time.monotonic() - start


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def server_generate(client: Any, ids: list[list[int]], max_tokens: int) -> float:
    t0 = time.perf_counter()
    res = client.generate(ids, n=1, temperature=1.0, max_tokens=max_tokens, seed=1234, ignore_eos=True)
    seconds = time.perf_counter() - t0
    assert all(len(c.token_ids) == max_tokens for c in res.flat())
    return seconds


def time_generation(runs: dict[str, Any], repeats: int, tokens: int) -> dict[str, Any]:
    """Warm each mode up, then time them in alternating order; median per mode."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(runs[name]())
    return {name: _gen_stats(t, tokens) for name, t in times.items()}


def bench_sync(args: argparse.Namespace, client: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from vroll.weightsync.sender import WeightSyncClient, WeightSyncConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(device)
    syncer = WeightSyncClient(client, WeightSyncConfig(backend="gloo", bucket_mb=args.bucket_mb))
    connect_start = time.perf_counter()
    syncer.connect()
    connect_s = time.perf_counter() - connect_start
    pushes = [syncer.push(model) for _ in range(1 + args.sync_repeats)]
    syncer.close()
    rest = pushes[1:] or pushes
    med = statistics.median(p.seconds for p in rest)
    out = {
        "backend": "gloo", "trainer_device": device, "bucket_mb": args.bucket_mb,
        "bytes": pushes[0].num_bytes, "tensors": pushes[0].num_tensors, "buckets": pushes[0].num_buckets,
        "connect_s": round(connect_s, 3), "first_s": round(pushes[0].seconds, 3),
        "seconds": [round(p.seconds, 3) for p in rest], "median_s": round(med, 3),
        "gb_per_s": round(pushes[0].num_bytes / med / 1e9, 3), "weight_version": pushes[-1].weight_version,
    }
    print(f"sync: {out}", flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


class PoolEngine:
    """One replica through ``ReplicaPool`` (what ``vroll serve`` runs), minus the HTTP layer."""

    def __init__(self, args: argparse.Namespace, ids: list[list[int]]) -> None:
        import torch

        from vroll.server.config import ServeConfig
        from vroll.server.pool import ReplicaPool

        on_cpu = not torch.cuda.is_available()
        cfg = ServeConfig(model=args.model, gpu_memory_utilization=args.gpu_memory_utilization,
                          max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                          tensor_parallel_size=args.tensor_parallel_size,
                          kv_cache_memory_gib=0.5 if on_cpu else None)
        self.ids = ids
        self.pool = ReplicaPool(cfg.engine_spec(on_cpu), 1, "warning")
        start = time.monotonic()
        self.pool.start()
        try:
            self.pool.wait_ready(900)
        except BaseException:
            self.pool.shutdown()
            raise
        self.info = {"engine_start_s": round(time.monotonic() - start, 1)}
        print(f"pool replica: {self.info}", flush=True)

    def generate(self, max_tokens: int) -> float:
        from vroll.protocol import GenerateJob, GenerateResult, SamplingSpec

        sampling = SamplingSpec(n=1, temperature=1.0, max_tokens=max_tokens, seed=1234, ignore_eos=True)
        t0 = time.perf_counter()
        reply = self.pool.submit_all([GenerateJob(self.ids, sampling, 0)])[0].result()
        seconds = time.perf_counter() - t0
        assert isinstance(reply, GenerateResult), reply
        assert all(len(c.token_ids) == max_tokens for r in reply.results for c in r.completions)
        return seconds

    def stop(self) -> None:
        self.pool.shutdown()


def _time_modes(engines: dict[str, Any], ids: list[list[int]], args: argparse.Namespace,
                result: dict[str, Any]) -> None:
    runs = {name: (lambda e=e: e(args.max_tokens)) for name, e in engines.items()}
    small = {f"{name}_1tok": (lambda e=e: e(1)) for name, e in engines.items()}
    result.update(time_generation(runs, args.repeats, len(ids) * args.max_tokens))
    result.update(time_generation(small, args.repeats, len(ids)))
    print({k: result[k]["tokens_per_s"] for k in (*runs, *small)}, flush=True)


def run_all(args: argparse.Namespace, ids: list[list[int]], result: dict[str, Any]) -> None:
    result["mode"] = "sequential" if args.sequential else "interleaved"
    proc, client, start_s = start_server(args)
    others: dict[str, Any] = {}
    try:
        result["server_start_s"] = round(start_s, 1)
        result["info"] = client.info().model_dump()
        engines: dict[str, Any] = {"server": lambda m: server_generate(client, ids, m)}
        if not args.sequential:
            if "pool" in args.modes:
                others["pool"] = PoolEngine(args, ids)
                result["pool_engine"] = others["pool"].info
            if "inproc" in args.modes:
                others["inproc"] = InprocEngine(args, ids, args.gpu_memory_utilization)
                result["inproc_engine"] = others["inproc"].info
            engines.update({name: e.generate for name, e in others.items()})
        _time_modes(engines, ids, args, result)
        result["sync"] = bench_sync(args, client)
    finally:
        for e in others.values():
            e.stop()
        result["server_exit_code"] = stop_server(proc)
    if args.sequential:
        for name in [m for m in args.modes if m != "server"]:
            engine = PoolEngine(args, ids) if name == "pool" else InprocEngine(args, ids, args.gpu_memory_utilization)
            try:
                result[f"{name}_engine"] = engine.info
                _time_modes({name: engine.generate}, ids, args, result)
            finally:
                engine.stop()


def _inproc_child(args: argparse.Namespace, ids: list[list[int]], gpu_util: float, conn) -> None:  # noqa: ANN001
    """Build ``VLLMEngine`` as a DP=1 replica would (TP as asked), then time ``("gen", max_tokens)`` commands."""
    try:
        from vroll.protocol import GenerateJob, SamplingSpec
        from vroll.server.config import ServeConfig
        from vroll.server.pool import device_slices

        env = device_slices(1, args.tensor_parallel_size)[0].env
        os.environ.update(env)
        cfg = ServeConfig(model=args.model, gpu_memory_utilization=gpu_util,
                          max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                          tensor_parallel_size=args.tensor_parallel_size,
                          kv_cache_memory_gib=None if env.get("CUDA_VISIBLE_DEVICES") else 0.5)
        on_cpu = "VLLM_CPU_OMP_THREADS_BIND" in env
        from vroll.engine.vllm_adapter import VLLMEngine

        start = time.monotonic()
        engine = VLLMEngine(cfg.engine_spec(on_cpu))
        conn.send({"engine_start_s": round(time.monotonic() - start, 1), "gpu_memory_utilization": gpu_util})
    except BaseException as exc:  # noqa: BLE001 - report to the parent
        import traceback

        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]})
        return
    while True:
        cmd = conn.recv()
        if cmd[0] != "gen":
            return
        sampling = SamplingSpec(n=1, temperature=1.0, max_tokens=cmd[1], seed=1234, ignore_eos=True)
        t0 = time.perf_counter()
        res = engine.generate(GenerateJob(ids, sampling, 0))
        seconds = time.perf_counter() - t0
        assert all(len(c.token_ids) == cmd[1] for r in res for c in r.completions)
        conn.send(seconds)


class InprocEngine:
    """``VLLMEngine`` in its own process (a fresh interpreter, like a replica), driven by a pipe."""

    def __init__(self, args: argparse.Namespace, ids: list[list[int]], gpu_util: float) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_inproc_child, args=(args, ids, gpu_util, child))
        self.proc.start()
        child.close()
        self.info = self.conn.recv() if self.conn.poll(900) else {"error": "no engine after 900 s"}
        print(f"inproc engine: {self.info}", flush=True)
        if "error" in self.info:
            self.stop()
            raise RuntimeError(f"in-process engine failed: {self.info['error']}")

    def generate(self, max_tokens: int) -> float:
        """Seconds for one ``generate`` of the batch, timed inside the engine's process."""
        self.conn.send(("gen", max_tokens))
        return float(self.conn.recv())

    def stop(self) -> None:
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except ImportError:
        info["vllm"] = "not installed"
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.model = str(Path(args.model).resolve())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ids = prompt_ids(args.model, args.prompts)
    meta = json.loads((Path(args.model) / "vroll_random_model.json").read_text()) \
        if (Path(args.model) / "vroll_random_model.json").exists() else {}
    result: dict[str, Any] = {
        "benchmark": "gpu_smoke", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
        "model": {"path": args.model, **meta}, "prompts": args.prompts, "max_tokens": args.max_tokens,
        "tensor_parallel_size": args.tensor_parallel_size, "data_parallel_size": args.data_parallel_size,
        "serve_flags": serve_flags(args), "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1),
    }

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=2))

    try:
        run_all(args, ids, result)
        def overhead(fast: str, slow: str) -> float | None:  # % more time `slow` takes than `fast`
            if fast not in result or slow not in result:
                return None
            return round((result[slow]["median_s"] / result[fast]["median_s"] - 1) * 100, 2)

        result["server_overhead_pct"] = overhead("inproc", "server")  # whole server over vLLM alone
        result["replica_overhead_pct"] = overhead("inproc", "pool")  # replica process + pipe
        result["http_overhead_pct"] = overhead("pool", "server")  # FastAPI + JSON + httpx
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        save()
        keys = ("mode", "server", "pool", "inproc", "server_1tok", "pool_1tok", "inproc_1tok", "sync",
                "server_overhead_pct", "replica_overhead_pct", "http_overhead_pct")
        print(json.dumps({k: result.get(k) for k in keys}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
