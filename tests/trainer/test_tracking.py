"""``--report_to wandb``: offline (saying so) without network or API key, a clear error without
the package. A stand-in ``wandb`` module records what ``wandb.init`` got, so this runs
whether or not wandb is installed; the real package is exercised by test_guide.py when present."""

from __future__ import annotations

import logging
import socket
import sys
import types

import pytest

from vroll.trainer.bookkeeping import tracking
from vroll.trainer.bookkeeping.artifacts import RunArtifacts
from vroll.trainer.config import GRPOConfig


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")

    class Run:
        def log(self, *a, **k): ...

        def finish(self): ...

    def init(**kwargs):
        calls.append(kwargs)
        return Run()

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return calls


def test_no_network_means_offline_with_a_clear_message(fake_wandb, monkeypatch, tmp_path, caplog):
    with socket.socket() as s:  # a port nothing listens on: the W&B server is unreachable
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{dead}")
    with caplog.at_level(logging.WARNING, logger="vroll.trainer.bookkeeping.tracking"):
        RunArtifacts(tmp_path, True, ["wandb"], "run-1", {"a": 1}).close()
    assert fake_wandb == [dict(name="run-1", config={"a": 1}, dir=str(tmp_path), mode="offline")]
    assert "127.0.0.1 is unreachable (no network): logging offline" in caplog.text and "wandb sync" in caplog.text


def test_a_reachable_server_without_api_key_is_offline_too_and_wandb_mode_wins(fake_wandb, monkeypatch, tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        monkeypatch.setenv("NETRC", str(tmp_path / "none"))
        monkeypatch.setenv("HOME", str(tmp_path))
        assert tracking.offline_reason() == "no API key (set WANDB_API_KEY or run `wandb login`)"
        monkeypatch.setenv("WANDB_API_KEY", "k")
        assert tracking.offline_reason() is None  # online: wandb.init decides as usual
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.offline_reason() is None  # the user's choice is left alone
    tracking.open_wandb(None, {}, tmp_path)
    assert fake_wandb[-1]["mode"] is None


def test_without_the_package_the_error_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r"--report_to wandb needs the wandb package: pip install wandb"):
        tracking.open_wandb(None, {}, tmp_path)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(ValueError, match="needs the wandb package"):  # checked at trainer start, before loading
        GRPOConfig(report_to=["wandb"]).validate(1)
