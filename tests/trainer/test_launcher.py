"""With no server address: the server at the default address if one answers (seed 000's two commands:
tests/trainer/test_trl_script.py runs them), else the guide's layout: the trainer starts ``vroll serve`` on
the spare GPU (on CPU: a CPU server), and nothing outlives the trainer, not even after SIGKILL."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import free_port, make_tiny_model, wait_for
from vroll.engine.config import EngineConfig
from vroll.generation.launcher import probe_server, server_flags, spare_gpu
from vroll.trainer.config import GRPOConfig
from vroll.trainer.generators import spare_server_flags

REPO = Path(__file__).resolve().parents[2]


def test_the_last_visible_gpu_is_the_spare_one():
    assert spare_gpu(8, 7, None) == "7"
    assert spare_gpu(4, 3, "4,5,6,7") == "7"  # a CUDA_VISIBLE_DEVICES entry, not an index
    assert spare_gpu(4, 2, "GPU-aaa,GPU-bbb,GPU-ccc,GPU-ddd") == "GPU-ddd"


def test_no_spare_gpu_says_launch_one_process_fewer_or_colocate():
    with pytest.raises(ValueError, match=r"(?is)launch one process fewer \(torchrun --nproc_per_node 7.*colocate"):
        spare_gpu(8, 8, None)
    with pytest.raises(ValueError, match="nproc_per_node 1"):
        spare_gpu(1, 1, None)


def test_only_a_missing_address_starts_a_server():
    assert GRPOConfig().launches_server
    assert not GRPOConfig(vllm_server_port=8000).launches_server  # the two-command layout
    assert not GRPOConfig(vllm_server_base_url="http://h:1").launches_server
    assert not GRPOConfig(vllm_mode="colocate").launches_server and not GRPOConfig(use_vllm=False).launches_server
    assert GRPOConfig().server_url == "http://127.0.0.1:8000"
    # TRL's client default host, 0.0.0.0 (a server's "every interface"), is this machine
    assert GRPOConfig(vllm_server_host="0.0.0.0", vllm_server_port=8001).server_url == "http://127.0.0.1:8001"


def test_the_probe_tells_no_server_from_a_server_that_is_not_vrolls():
    """Only a vroll server is trained against (seed 000's flow); with nothing there, or something else (a 404
    here), the trainer starts its own and says why. A vroll server answering: test_trl_script.py."""
    assert probe_server(f"http://127.0.0.1:{free_port()}", timeout_s=1).startswith("no server at http://127.0.0.1:")

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_error(404)

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{other.server_address[1]}"
        assert probe_server(url) == f"{url} answers, but not as a vroll generation server (GET /health: HTTP 404)"
    finally:
        other.shutdown()
        other.server_close()


def test_the_server_gets_the_trainers_vllm_settings():
    cfg = GRPOConfig(model_name_or_path="/models/x", vllm_gpu_memory_utilization=0.7, vllm_dtype="bfloat16",
                     max_prompt_length=1024, max_completion_length=1024, vllm_enforce_eager=True, seed=5)
    got = spare_server_flags(cfg)
    pairs = dict(zip(got[::2], got[1::2], strict=False))
    assert pairs["--model"] == "/models/x" and pairs["--dtype"] == "bfloat16" and pairs["--seed"] == "5"
    assert pairs["--gpu-memory-utilization"] == "0.7" and pairs["--max-model-len"] == "2048"
    assert "--enforce-eager" in got
    # a CPU server starts eager: vLLM's CPU compile outlasts the default server timeout
    assert "--enforce-eager" not in server_flags("m", 0, EngineConfig())
    assert "--enforce-eager" in server_flags("m", 0, EngineConfig(), on_cpu=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.slow
def test_sigkill_of_the_trainer_leaves_no_server_behind(tiny, tmp_path):
    """A CPU trainer with no server address starts one; SIGKILL of the trainer (no atexit, no
    signal handler) still takes the server and its engine processes down (PR_SET_PDEATHSIG)."""
    log = tmp_path / "trainer.log"
    cmd = [sys.executable, "-m", "vroll", "grpo", "--model_name_or_path", str(tiny), "--max_steps", "1000",
           "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8",
           "--vllm_enforce_eager", "true", "--vllm_kv_cache_memory_gib", "0.5", "--vllm_server_timeout", "900",
           "--save_final_model", "false", "--output_dir", str(tmp_path / "run")]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    trainer = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    try:
        assert wait_for(lambda: "vLLM server ready" in log.read_text() or trainer.poll() is not None, timeout=900,
                        poll=1.0), log.read_text()[-3000:]
        assert trainer.poll() is None, log.read_text()[-3000:]
        family = psutil.Process(trainer.pid).children(recursive=True)
        servers = [p for p in family if "serve" in p.cmdline()]
        assert servers, [p.cmdline() for p in family]  # the server is the trainer's child
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(30)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and any(_alive(p) for p in family):
            time.sleep(0.5)
        assert not [p.pid for p in family if _alive(p)], "processes outlived the trainer"
    finally:
        if trainer.poll() is None:
            trainer.kill()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
