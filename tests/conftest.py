"""Shared fixtures: real servers on the embedded model, started once and stopped as soon as possible.

Starting a vLLM engine costs ~30-60 s on the CPU machine, so the suite shares four servers among
all the tests that use them: a DP=2 server (generation, weight sync), a DP=1 server with an API key
(DP equivalence and auth), a DP=1 server for the trainers, and a DP=1 server on a tiny random-weight
model (``tiny_model``) for the trainer tests that check mechanics (versions, staleness, resume, ranks),
not learning: their training steps on it take a fraction of the embedded model's. A replica holds ~2.5 GB in three
processes (frontend, engine core, worker), and all three servers alive for the whole session pushed
the suite past the machine's 24 GiB, so each server is stopped right after the last test that uses
it, and the test modules that use one server run back to back (:func:`pytest_collection_modifyitems`).
Tests that change a shared server's weights put the original weights back when they finish (the
trainers' server excepted: its users push freely).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import VLM_IMAGE_LIMIT, VLM_PIXEL_CAP, Served, make_tiny_model, start_server
from vroll.launch import ServerProcess
from vroll.models import resolve_model
from vroll.testing import build_tiny_vlm

TINY_MODEL = "<tiny_model>"  # in a server's flags: the session's tiny model folder (SharedServers.tiny_model)
TINY_VLM = "<tiny_vlm>"  # the session's tiny Qwen2.5-VL folder (SharedServers.tiny_vlm)

# fixture name -> (`vroll serve` flags, API key)
SHARED_SERVERS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "server_dp2": (("--data-parallel-size", "2"), None),
    "server_dp1_key": (("--data-parallel-size", "1"), "test-secret"),
    "server_trainer": (("--data-parallel-size", "1"), None),
    "server_tiny": (("--data-parallel-size", "1", "--model", TINY_MODEL), None),
    "server_vlm": (("--data-parallel-size", "1", "--model", TINY_VLM, "--limit-mm-per-prompt", str(VLM_IMAGE_LIMIT),
                    "--max-image-pixels", str(VLM_PIXEL_CAP)), None),
}
_SERVERS = pytest.StashKey["SharedServers"]()
_LAST_USER = pytest.StashKey[dict[str, str]]()


class SharedServers:
    """The shared servers of this session: started on first use, stopped after their last user."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: dict[str, ServerProcess] = {}

    def tiny_model(self) -> Path:
        """A 2-layer random-weight Qwen2 with the embedded tokenizer (``vroll.testing``), built once."""
        folder = self.root / "tiny-model"
        if not (folder / "config.json").exists():
            make_tiny_model(folder)
        return folder

    def tiny_vlm(self) -> Path:
        """A tiny random-weight Qwen2.5-VL (``vroll.testing.build_tiny_vlm``), built once."""
        folder = self.root / "tiny-vlm"
        if not (folder / "config.json").exists():
            build_tiny_vlm(folder)
        return folder

    def get(self, name: str) -> ServerProcess:
        if name not in self.running:
            flags, api_key = SHARED_SERVERS[name]
            models = {TINY_MODEL: self.tiny_model, TINY_VLM: self.tiny_vlm}
            flags = tuple(str(models[f]()) if f in models else f for f in flags)
            folder = self.root / name
            folder.mkdir(parents=True, exist_ok=True)
            self.running[name] = start_server(folder, *flags, api_key=api_key)
        return self.running[name]

    def stop(self, name: str) -> None:
        server = self.running.pop(name, None)
        if server is not None:
            server.stop()

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules that use the same shared server run back to back (in collection order otherwise), and each
    server's last user is noted, so that it stops right after that test."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    uses = {m: {s for it in its for s in SHARED_SERVERS if s in it.fixturenames} for m, its in modules.items()}
    order: list[str] = []
    for module in modules:
        if module in order:
            continue
        order.append(module)
        for server in sorted(uses[module], key=list(SHARED_SERVERS).index):
            order += [m for m in modules if m not in order and server in uses[m]]
    items[:] = [item for module in order for item in modules[module]]
    config.stash[_LAST_USER] = {server: item.nodeid for item in items for server in SHARED_SERVERS
                                if server in item.fixturenames}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield
    servers = item.config.stash.get(_SERVERS, None)
    for server, last in item.config.stash.get(_LAST_USER, {}).items():
        if last == item.nodeid and servers is not None:
            servers.stop(server)  # nothing after this test uses it: free its memory now


@pytest.fixture(scope="session")
def shared_servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServers]:
    servers = SharedServers(tmp_path_factory.mktemp("servers"))
    request.config.stash[_SERVERS] = servers
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def server_dp2(shared_servers: SharedServers) -> ServerProcess:
    """DP=2: generation and weight sync."""
    return shared_servers.get("server_dp2")


@pytest.fixture(scope="session")
def server_dp1_key(shared_servers: SharedServers) -> ServerProcess:
    """DP=1 with an API key: DP equivalence and auth."""
    return shared_servers.get("server_dp1_key")


@pytest.fixture(scope="session")
def server_trainer(shared_servers: SharedServers) -> ServerProcess:
    """A DP=1 server for the trainer tests, which push weights to it freely."""
    return shared_servers.get("server_trainer")


@pytest.fixture(scope="session")
def server_tiny(shared_servers: SharedServers) -> ServerProcess:
    """A DP=1 server on :func:`tiny_model`, for trainer tests of mechanics; its users push freely."""
    return shared_servers.get("server_tiny")


@pytest.fixture(scope="session")
def server_vlm(shared_servers: SharedServers) -> ServerProcess:
    """A DP=1 server on :func:`tiny_vlm` (at most 2 images a prompt, 200x200 pixels); its users that push
    weights give the base ones back first (``test_vlm_sync``)."""
    return shared_servers.get("server_vlm")


@pytest.fixture(scope="session")
def tiny_vlm(shared_servers: SharedServers) -> str:
    """The tiny random-weight Qwen2.5-VL ``server_vlm`` serves."""
    return str(shared_servers.tiny_vlm())


@pytest.fixture(scope="session")
def tiny_model(shared_servers: SharedServers) -> str:
    """The tiny random-weight model ``server_tiny`` serves: trainers pointed at that server load this one."""
    return str(shared_servers.tiny_model())


@pytest.fixture(scope="session")
def tiny_served(server_tiny: ServerProcess, tiny_model: str) -> Served:
    """``server_tiny`` with its model folder, for the trainers that use it."""
    return Served(server_tiny, tiny_model)


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model: str):
    """:func:`tiny_model` in transformers, float32, for reference forward passes and pushes."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def model_path() -> str:
    return resolve_model(None)


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
