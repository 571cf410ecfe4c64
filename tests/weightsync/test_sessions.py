"""Weight-sync sessions on a real DP=2 server: they cannot be hijacked, and a trainer
that is not there (wrong address, killed after its init) never blocks generation."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from vroll.client import ServerError
from vroll.launch import free_port
from vroll.protocol import SESSION_HEADER
from vroll.weightsync.group import JOIN_TIMEOUT_S
from vroll.weightsync.sender import WeightSender, WeightSyncConfig

pytestmark = pytest.mark.slow

PROMPTS = ["What is 17 + 25?", "Name a color."]  # one per replica under DP=2


@pytest.fixture(scope="module")
def trainer(server_dp2, hf_model):
    sender = WeightSender(server_dp2.client(), WeightSyncConfig(bucket_mb=64, timeout_s=120))
    sender.connect()
    yield sender
    sender.close()


def timed_generate(server) -> float:  # noqa: ANN001
    """Seconds for one small greedy request (on its own client: safe from any thread)."""
    with server.client() as client:
        start = time.monotonic()
        client.generate(PROMPTS, temperature=0.0, max_tokens=4)
        return time.monotonic() - start


def test_a_wrong_or_absent_session_id_is_refused_and_never_echoed(server_dp2, trainer, hf_model):
    sid = trainer.session_id
    assert sid is not None and len(sid) >= 32
    wrong = sid[:-1] + ("A" if sid[-1] != "A" else "B")
    update = {"buckets": [{"dtype": "bfloat16", "tensors": [{"name": "model.norm.weight", "shape": [576]}]}]}
    http = httpx.Client(base_url=server_dp2.url, timeout=60)
    attempts = {
        "update, wrong id": http.post("/weights/update", json={"session_id": wrong, **update}),
        "update, no id": http.post("/weights/update", json=update),
        "status, wrong id": http.get("/weights/update/1", headers={SESSION_HEADER: wrong}),
        "status now, wrong id": http.get("/weights/update/1?wait=false", headers={SESSION_HEADER: wrong}),
        "status, no id": http.get("/weights/update/1"),
        "close, wrong id": http.post("/weights/close", json={"session_id": wrong}),
        "close, no id": http.post("/weights/close", json={}),
        "second init": http.post("/weights/init", json={"host": "127.0.0.1", "port": free_port()}),
    }
    for what, resp in attempts.items():
        assert resp.status_code in (403, 409, 422), (what, resp.status_code, resp.text)
        assert sid not in resp.text and wrong not in resp.text, what
    assert attempts["update, wrong id"].status_code == 403
    assert attempts["status, no id"].status_code == 403
    assert attempts["close, wrong id"].status_code == 403
    assert attempts["second init"].status_code == 409
    assert "another trainer" in attempts["second init"].json()["error"]
    assert sid not in server_dp2.log.read_text(errors="replace")
    version = server_dp2.client().info().weight_version
    stats = trainer.push(hf_model)
    assert stats.weight_version == version + 1  # the real trainer is untouched
    # ?wait=false (what a push asks while a collective stalls): the state now, and only to its session
    with pytest.raises(ServerError, match=r"no update 999 in this session \(recent ones: \[") as unknown:
        trainer.client.weights_status(sid, 999, wait=False)
    assert unknown.value.status == 404
    last = int(unknown.value.reason.rsplit("[", 1)[1].rstrip("])").split(",")[-1])  # this push's update
    now = trainer.client.weights_status(sid, last, wait=False)
    assert (now.update_id, now.state, now.error, now.weight_version) == (last, "done", None, stats.weight_version)


def test_init_naming_no_trainer_is_refused_within_seconds_while_generation_goes_on(server_dp2, trainer,
                                                                                   hf_model):
    client = server_dp2.client()
    with socket.socket() as mute:  # accepts connections, speaks no store protocol
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        for port in (free_port(), mute.getsockname()[1]):
            with ThreadPoolExecutor(1) as pool:
                during = pool.submit(timed_generate, server_dp2)
                start = time.monotonic()
                with pytest.raises(ServerError) as err:  # force: it must not drop the live session either
                    client.weights_init("127.0.0.1", port, "gloo", 60, force=True)
                refused_after = time.monotonic() - start
                assert err.value.status == 400 and "no weight-sync rendezvous answered" in err.value.reason
                assert refused_after < 10, refused_after
                assert during.result(timeout=60) < 20
            assert timed_generate(server_dp2) < 20  # no replica was told to join anything
    for bad in (0.5, 601, 1e9):
        with pytest.raises(ServerError) as err:
            client.weights_init("127.0.0.1", free_port(), "gloo", bad)
        assert err.value.status == 400 and "timeout_s must be in 1..600" in err.value.reason
    version = client.info().weight_version
    assert trainer.push(hf_model).weight_version == version + 1


DYING_TRAINER = """
import os, sys
from vroll.client import GenerationClient
from vroll.weightsync.group import host_store, make_group
store = host_store("127.0.0.1", 0, 1, 120)
resp = GenerationClient(sys.argv[1]).weights_init("127.0.0.1", store.port, "gloo", 120, force=True)
if sys.argv[2] == "after_connect":
    make_group(store, 0, resp.world_size, "gloo", 120, resp.session_id)
print("INIT", flush=True)
os._exit(1)  # killed right after its init
"""


@pytest.mark.parametrize("when", ["after_init", "after_connect"])
def test_a_trainer_killed_after_init_is_replaced_by_the_next(server_dp2, trainer, hf_model, when):
    run = subprocess.run([sys.executable, "-c", DYING_TRAINER, server_dp2.url, when],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "INIT" in run.stdout, run.stderr[-2000:]
    assert timed_generate(server_dp2) < JOIN_TIMEOUT_S + 20  # the replicas' join gave up, bounded
    start = time.monotonic()
    trainer.connect()  # no force: the dead trainer's session is stale
    assert time.monotonic() - start < 60
    version = server_dp2.client().info().weight_version
    assert trainer.push(hf_model).weight_version == version + 1
