"""Helpers the tests share (fixtures live in conftest.py): servers, metrics files, polling."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vroll.server.launch import ServerProcess, free_port, launch_server

__all__ = ["ServerProcess", "free_port", "make_tiny_model", "read_metrics", "start_server", "wait_for"]

REPO = Path(__file__).resolve().parents[1]

SERVER_START_TIMEOUT_S = 900


def start_server(tmp: Path, *flags: str, api_key: str | None = None) -> ServerProcess:
    """``vroll serve`` (small CPU settings) on a free loopback port, ready to use."""
    log = tmp / f"serve-{len(list(tmp.glob('serve-*.log')))}.log"
    return launch_server(["--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-gib", "0.5", *flags],
                         log, api_key=api_key, ready_timeout_s=SERVER_START_TIMEOUT_S)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's ``metrics.jsonl``, one dict per logged step."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, poll: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def make_tiny_model(out: Path) -> Path:
    """A tiny random Qwen2-shaped text model (``make_model.py --shape tiny``): seconds to build, and its
    attention heads split in two (the embedded model's 9 do not)."""
    subprocess.run([sys.executable, str(REPO / "benchmarks/gpu/make_model.py"), "--shape", "tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    return out
