"""The guide's layout: with no server address the trainer starts ``vroll serve`` on the spare GPU
(on CPU: a CPU server), and nothing outlives the trainer, not even after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import make_tiny_model, wait_for
from vroll.generation.launcher import spare_gpu
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


def test_the_server_gets_the_trainers_vllm_settings():
    cfg = GRPOConfig(model_name_or_path="/models/x", vllm_gpu_memory_utilization=0.7, vllm_dtype="bfloat16",
                     max_prompt_length=1024, max_completion_length=1024, vllm_enforce_eager=True, seed=5)
    got = spare_server_flags(cfg)
    pairs = dict(zip(got[::2], got[1::2], strict=False))
    assert pairs["--model"] == "/models/x" and pairs["--dtype"] == "bfloat16" and pairs["--seed"] == "5"
    assert pairs["--gpu-memory-utilization"] == "0.7" and pairs["--max-model-len"] == "2048"
    assert "--enforce-eager" in got


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
