"""Shared fixtures: real servers on the embedded model.

Starting a vLLM engine costs ~30-60 s on the CPU machine, so the suite starts few servers and
shares them: a DP=2 server (generation and weight sync) and a DP=1 server with an API key (DP
equivalence and auth), each per module, and a DP=1 server for the trainers, per session. A
replica holds ~2.5 GB in three processes (frontend, engine core, worker): servers kept for the
whole session pushed the suite past the machine's 24 GiB. Tests that change weights put the
original weights back when they finish.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers import start_server
from vroll.launch import ServerProcess
from vroll.models import resolve_model


@pytest.fixture(scope="session")
def model_path() -> str:
    return resolve_model(None)


@pytest.fixture(scope="module")  # per module: every replica now holds ~2.5 GB in 3 processes
def server_dp2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("dp2"), "--data-parallel-size", "2")
    yield server
    server.stop()


@pytest.fixture(scope="module")  # per module: every replica now holds ~2.5 GB in 3 processes
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


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state: a trainer built with bf16 in one test would refuse
    another's ``mixed_precision='no'`` in the next. Each test starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
