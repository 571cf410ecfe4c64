"""Shared fixtures: real servers on the embedded model, started once per test session.

Starting a vLLM engine costs ~30-60 s on the CPU machine, so the suite starts few
servers and shares them: a DP=2 server (generation and weight sync), a DP=1
server with an API key (DP equivalence and auth), and a DP=1 server for the trainers. Tests that change weights put the
original weights back when they finish.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vroll.models import resolve_model
from vroll.server.launch import ServerProcess, free_port, launch_server

__all__ = ["ServerProcess", "free_port", "read_metrics", "start_server", "wait_for"]

SERVER_START_TIMEOUT_S = 900


def start_server(tmp: Path, *flags: str, api_key: str | None = None) -> ServerProcess:
    """``vroll serve`` (small CPU settings) on a free loopback port, ready to use."""
    log = tmp / f"serve-{len(list(tmp.glob('serve-*.log')))}.log"
    return launch_server(["--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-gib", "0.5", *flags],
                         log, api_key=api_key, ready_timeout_s=SERVER_START_TIMEOUT_S)


@pytest.fixture(scope="session")
def model_path() -> str:
    return resolve_model(None)


@pytest.fixture(scope="session")
def server_dp2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("dp2"), "--data-parallel-size", "2")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_dp1_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("dp1"), "--data-parallel-size", "1",
                          api_key="test-secret")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A DP=1 server for the trainer tests, which push weights to it freely."""
    server = start_server(tmp_path_factory.mktemp("trainer"), "--data-parallel-size", "1")
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


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's ``metrics.jsonl``, one dict per logged step."""
    import json

    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, timeout: float = 30.0, poll: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False
