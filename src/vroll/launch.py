"""``vroll serve`` as a subprocess: for the trainer's spare-GPU server, the demo, the benchmarks and the tests.

A client-side tool (it talks to the server through ``GenerationClient`` only), so it lives beside the
client, not in the server package. One place that knows how to start a server on a free loopback port, wait until it
is ready, show its log when it is not, and stop it (and its replicas) cleanly.

A launched server dies with its launcher, however the launcher ends: the child asks the
kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``: covers SIGKILL too), and a
normal exit or Ctrl-C of the launcher stops it from an ``atexit`` hook. The server's own
SIGTERM path stops its replicas. Linux delivers the death signal when the *thread* that
launched the server exits, so launch from a thread that lives as long as the server.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vroll.client import GenerationClient, ServerUnavailable


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerExited(RuntimeError):
    """The server process exited before it was ready."""

    def __init__(self, code: int) -> None:
        super().__init__(f"vroll serve exited with code {code}")
        self.code = code


@dataclass
class ServerProcess:
    """A ``vroll serve`` subprocess and its log file."""

    url: str
    process: subprocess.Popen
    log: Path
    api_key: str | None = None

    def client(self, **kw) -> GenerationClient:  # noqa: ANN003
        return GenerationClient(self.url, api_key=self.api_key, **kw)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout_s: float) -> None:
        """Until ``/health`` says ready. Raises :class:`ServerExited` as soon as the process exits
        (short waits, so a server dying during startup is noticed at once), ``ServerUnavailable``
        after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                try:
                    client.wait_until_ready(timeout=min(5.0, max(0.0, deadline - time.monotonic())), poll=1.0)
                    return
                except ServerUnavailable:
                    if self.process.poll() is not None:
                        raise ServerExited(self.process.returncode) from None
                    if time.monotonic() >= deadline:
                        raise

    def stop(self) -> int:
        """SIGTERM (the server stops its replicas), then SIGKILL of its group if it hangs."""
        atexit.unregister(self.stop)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: a new session (Ctrl-C goes to the launcher only) that gets
    SIGTERM when the launcher dies."""
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the atexit hook still covers a normal exit and Ctrl-C


# What torchrun / accelerate set for THEIR workers. A server started from one of them is not a member
# of that world: with TORCHELASTIC_USE_AGENT_STORE=True inherited, torch makes the engine's own
# process-group store a client of an agent store that nobody hosts, and vLLM waits for it forever.
_LAUNCHER_VARS = frozenset({"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                            "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"})


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a server child: the launcher's rendezvous removed, ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


def launch_server(flags: Sequence[str], log: Path, api_key: str | None = None,
                  env: dict[str, str] | None = None, ready_timeout_s: float | None = 900.0) -> ServerProcess:
    """Start ``python -m vroll serve FLAGS`` on a free loopback port, logging to ``log``.

    With ``ready_timeout_s`` it returns once ``/health`` says ready, or stops the server
    and raises with the tail of its log; with ``None`` it returns at once.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "vroll", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
    if api_key:
        cmd += ["--api-key", api_key]
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,  # noqa: PLW1509
                            env=server_env(env))
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log, api_key)
    atexit.register(server.stop)
    if ready_timeout_s is not None:
        try:
            server.wait_ready(ready_timeout_s)
        except BaseException:
            server.stop()
            raise RuntimeError(f"vroll serve did not start; log tail ({log}):\n{server.log_tail()}") from None
    return server
