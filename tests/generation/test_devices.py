"""The GPU-sharing rule (TRL issue #2922) as a pure check.

CUDA cannot run here, so these use made-up GPU UUIDs; ``tests/gpu/test_gpu_server.py``
checks the same refusal with a real server and trainer on one GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

from vroll.generation.devices import check_colocate_memory, gpu_uuid, server_conflict

URL = "http://127.0.0.1:8000"


def test_no_conflict_on_separate_gpus_or_cpu():
    assert server_conflict(["GPU-b", "GPU-c"], ["GPU-a"], URL) is None
    assert server_conflict([None, None], [], URL) is None  # CPU trainer, CPU server
    assert server_conflict([None], ["GPU-a"], URL) is None  # CPU trainer, GPU server


def test_shared_gpu_is_refused_with_how_to_split():
    msg = server_conflict(["GPU-a", "GPU-b"], ["GPU-b"], URL)
    assert msg is not None
    assert "training process(es) [1]" in msg and URL in msg and "TRL issue #2922" in msg
    assert "CUDA_VISIBLE_DEVICES=0 vroll serve" in msg and "--num_processes one fewer than the GPUs" in msg
    assert "--vllm_mode colocate" in msg


def test_cpu_devices_have_no_uuid_and_no_memory_check():
    assert gpu_uuid(torch.device("cpu")) is None
    check_colocate_memory(torch.device("cpu"), 0.9, sleep_mode=False)  # nothing to check: returns


def test_colocate_share_that_is_not_free_is_refused_with_what_fits(monkeypatch, caplog):
    # CUDA cannot run here: fake a GPU with 80 GiB of which 20 GiB are free (the model is loaded).
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))
    with pytest.raises(ValueError, match=r"vLLM would take 50% of cuda:0 \(40.0 GiB\) but only 20.0 GiB of 80.0 GiB "
                                         r"is free.*--vllm_gpu_memory_utilization to at most 0.20"):
        check_colocate_memory(torch.device("cuda:0"), 0.5, sleep_mode=False)
    with caplog.at_level(logging.WARNING, logger="vroll.generation.devices"):
        check_colocate_memory(torch.device("cuda:0"), 0.2, sleep_mode=True)  # fits: only a warning
    assert "takes 20% of it (16.0 GiB); training keeps 4.0 GiB while the engine sleeps" in caplog.text
