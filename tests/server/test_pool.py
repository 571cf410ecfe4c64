import os

import pytest

from vroll.server.pool import device_slices


def test_gpu_slices_follow_cuda_visible_devices_order(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    slices = device_slices(dp=2, tp=2)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slices] == ["4,5", "6,7"]
    with pytest.raises(ValueError, match="needs 6 GPUs, but 4 are visible"):
        device_slices(dp=3, tp=2)


def test_cpu_slices_split_the_cores(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    slices = device_slices(dp=2, tp=1)
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in slices] == ["0,1", "2,3"]
    (tp2,) = device_slices(dp=1, tp=2)
    assert tp2.env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    with pytest.raises(ValueError, match="need at least 8 CPU cores, found 4"):
        device_slices(dp=4, tp=2)
