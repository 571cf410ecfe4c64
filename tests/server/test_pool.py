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


# ------------------------------------------------ health and restart, with a stand-in replica
# The replica's pipe protocol spoken by a tiny process (no vLLM), so the pool's watchdog and
# restart logic run against real processes, real pipes and real signals in seconds.


def _fake_replica(conn, answer_pings: bool) -> None:  # noqa: ANN001
    from vroll.protocol import EngineInfo, JobDone, ReplicaReady
    from vroll.server.replica import Answer, Envelope, Ping, Pong

    conn.send(ReplicaReady(EngineInfo("fake", "float32", 16, "none", "cpu")))
    while True:
        msg = conn.recv()
        if isinstance(msg, Ping):
            if answer_pings:
                conn.send(Pong(0, 0.0))
        elif isinstance(msg, Envelope):
            if type(msg.job).__name__ == "ShutdownJob":
                return
            if type(msg.job).__name__ != "GenerateJob":  # generates never answer: they stay pending
                conn.send(Answer(msg.job_id, JobDone(7)))


def _handle(answer_pings: bool = True, **watchdog):  # noqa: ANN003, ANN202
    import multiprocessing as mp

    from vroll.server.pool import ReplicaHandle, Watchdog

    ctx = mp.get_context("spawn")

    def spawn():  # noqa: ANN202
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_fake_replica, args=(child, answer_pings), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    return ReplicaHandle(0, spawn, Watchdog(**watchdog))


def _wait(predicate, timeout: float = 30.0) -> bool:  # noqa: ANN001
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_killed_replica_fails_its_jobs_with_the_reason_and_is_restarted():
    import signal

    from vroll.protocol import GenerateJob, JobDone, PromptInput, ResetPrefixCacheJob, SamplingSpec
    from vroll.server.pool import ReplicaDied

    handle = _handle()
    restarted: list[int] = []
    handle.on_restart.append(restarted.append)
    assert handle.ready.wait(60) and handle.status.state == "ready"
    assert handle.submit(ResetPrefixCacheJob()).result(10) == JobDone(7)
    waiting = handle.submit(GenerateJob([PromptInput([1])], SamplingSpec(), 0))
    first = handle.process
    os.kill(first.pid, signal.SIGKILL)
    with pytest.raises(ReplicaDied, match="replica 0 failed: process killed by SIGKILL"):
        waiting.result(10)
    assert handle.status.state in ("restarting", "ready")
    assert _wait(lambda: handle.status.state == "ready" and restarted == [0])
    assert handle.process is not first and not first.is_alive()
    assert "restarted 1x" in handle.status.reason and "base weights" in handle.status.reason
    assert handle.submit(ResetPrefixCacheJob()).result(10) == JobDone(7)
    handle.fail_waiting("stop")
    os.kill(handle.process.pid, signal.SIGKILL)


def test_replica_that_answers_no_heartbeat_is_declared_stuck_and_restarted():
    import signal

    handle = _handle(answer_pings=False, heartbeat_timeout_s=2.0)
    assert handle.ready.wait(60)
    first = handle.process
    assert _wait(lambda: handle.process is not first, timeout=20)
    assert "stuck: no heartbeat" in handle.status.reason
    assert not first.is_alive()
    handle.fail_waiting("stop")
    os.kill(handle.process.pid, signal.SIGKILL)


def test_control_a_replica_that_answers_heartbeats_is_left_alone():
    import signal
    import time

    handle = _handle(heartbeat_timeout_s=2.0)
    assert handle.ready.wait(60)
    first = handle.process
    time.sleep(5)
    assert handle.process is first and handle.status.state == "ready" and handle.restarts == 0
    handle.fail_waiting("stop")
    os.kill(first.pid, signal.SIGKILL)
