"""A replica that dies, a server that is stopped: clear errors and no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from helpers import free_port, start_server, wait_for
from vroll.client import ServerError

pytestmark = pytest.mark.slow


def replica_processes(server) -> list[psutil.Process]:
    kids = psutil.Process(server.process.pid).children(recursive=False)
    return [k for k in kids if "spawn_main" in " ".join(k.cmdline())]


def test_killed_replica_gives_503_with_reason_while_restarting_then_sigterm_leaves_no_orphans(tmp_path):
    server = start_server(tmp_path, "--data-parallel-size", "2")
    try:
        replicas = replica_processes(server)
        assert len(replicas) == 2
        everyone = psutil.Process(server.process.pid).children(recursive=True)
        replicas[1].kill()
        assert wait_for(lambda: httpx.get(f"{server.url}/health").status_code == 503)
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "unhealthy"
        assert "1: restarting (process killed by SIGKILL" in " ".join(health["replicas"])
        with pytest.raises(ServerError) as err:
            server.client(retries=0).generate(["hi", "there"], max_tokens=2)
        assert err.value.status == 503 and "replica 1" in err.value.reason
    finally:
        code = server.stop()
    assert code == 0
    gone, alive = psutil.wait_procs(everyone, timeout=30)
    assert not alive, f"orphans left: {[p.pid for p in alive]}"


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "vroll", "serve", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in run.stderr


def test_bad_flags_fail_before_starting_anything():
    run = subprocess.run([sys.executable, "-m", "vroll", "vllm-serve", "--tensor_parallel_size", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "tensor-parallel-size must be >= 1" in run.stderr


@pytest.mark.parametrize("after_s", [0.0, 5.0], ids=["at-once", "mid-start"])  # replicas start in ~50 s here
def test_sigint_stops_a_starting_server(tmp_path, after_s):
    port = free_port()
    # the server's output goes to a file: a pipe nobody reads after the first line fills up (64 KiB of
    # vLLM start-up and shutdown logs) and blocks the server's own exit
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vroll", "serve", "--port", str(port), "--enforce-eager",
                                 "--kv-cache-memory-gib", "0.5"], stdout=out, stderr=subprocess.STDOUT)
    assert wait_for(lambda: "listening on" in log.read_text(), timeout=120, poll=0.01), log.read_text()[-3000:]
    time.sleep(after_s)
    kids = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    proc.wait(90)
    took = time.monotonic() - start
    _, alive = psutil.wait_procs(kids, timeout=30)
    assert not alive
    # A stop asked for is a clean exit, whenever it comes: not a KeyboardInterrupt traceback (a
    # signal between the replicas' start and uvicorn's handlers) nor "replica failed to start" (1).
    text = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in text, text[-3000:]
    assert took < 30, (took, text[-3000:])  # ~3 s here; slack for a loaded CI machine


def test_a_model_that_cannot_be_loaded_is_one_line_not_a_traceback():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vroll", "serve", "--model", "/no/such/dir", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vroll serve: cannot load model '/no/such/dir': no such folder"


def test_a_server_started_from_a_torchrun_worker_does_not_inherit_its_rendezvous(monkeypatch):
    """torchrun's TORCHELASTIC_USE_AGENT_STORE=True in a server's env made its engine's own process group a
    client of a store nobody hosts: vLLM hung at start on the GPU (the guide's layout, 2 x H200)."""
    from vroll.launch import server_env

    torchrun = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "none", "RANK": "0",
                "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500", "GROUP_RANK": "0"}
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    env = server_env({"CUDA_VISIBLE_DEVICES": "1"})
    assert not set(torchrun) & set(env), "the server inherited the launcher's rendezvous"
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"] == os.environ["PATH"]  # everything else is kept

    # the real hazard, on CPU: torch's tcp:// rendezvous under the agent-store flag only ever connects
    import datetime

    import torch.distributed as dist
    from torch.distributed.rendezvous import _create_c10d_store

    port = free_port()
    with pytest.raises(dist.DistNetworkError):  # negative control: what the engine met with the inherited env
        _create_c10d_store("127.0.0.1", port, 0, 1, datetime.timedelta(seconds=1))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    store = _create_c10d_store("127.0.0.1", port, 0, 1, datetime.timedelta(seconds=5))  # a rank-0 server: fine
    store.set("k", "v")
    assert store.get("k") == b"v"
