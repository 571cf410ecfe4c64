"""Shared fixtures: real servers on the embedded model, started once per test session.

Starting a vLLM engine costs ~30-60 s on the CPU machine, so the suite starts few
servers and shares them: a DP=2 server (generation and weight sync) and a DP=1
server with an API key (DP equivalence and auth). Tests that change weights put the
original weights back when they finish.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vroll.client import GenerationClient
from vroll.models import resolve_model

SERVER_START_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log: Path
    api_key: str | None = None

    def client(self, **kw) -> GenerationClient:
        return GenerationClient(self.url, api_key=self.api_key, **kw)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(tmp: Path, *flags: str, api_key: str | None = None) -> RunningServer:
    """``vroll serve`` in a subprocess on a free loopback port, ready to use."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "vroll", "serve", "--port", str(port), "--enforce-eager",
           "--max-model-len", "512", "--kv-cache-memory-gib", "0.5", *flags]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    server = RunningServer(f"http://127.0.0.1:{port}", proc, log, api_key)
    try:
        server.client().wait_until_ready(timeout=SERVER_START_TIMEOUT_S, poll=1.0)
    except Exception:
        server.stop()
        raise RuntimeError(f"server did not start:\n{server.log_tail()}") from None
    return server


@pytest.fixture(scope="session")
def model_path() -> str:
    return resolve_model(None)


@pytest.fixture(scope="session")
def server_dp2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("dp2"), "--data-parallel-size", "2")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_dp1_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(tmp_path_factory.mktemp("dp1"), "--data-parallel-size", "1",
                          api_key="test-secret")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hf_model(model_path: str):
    """The embedded model in transformers, float32, for reference forward passes."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    return model


def wait_for(predicate, timeout: float = 30.0, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False
