"""Several servers (``--vllm_server_base_url a b``): a ``ServerPool`` over two real CPU servers.

The two servers start once for the module. The tests that need both come first; the last one
kills one of them in the middle of a ``vroll grpo`` run.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import psutil
import pytest

from helpers import ServerProcess, perturbed, read_metrics, start_servers, wait_for
from vroll.flags import parse_config
from vroll.generation.pool import ServerPool, split_by_weight
from vroll.generation.prompts import encode_prompts
from vroll.generation.rollout import Rollout
from vroll.generation.server import ServerGenerator
from vroll.protocol import PromptInput, SamplingSpec
from vroll.trainer.config import GRPOConfig
from vroll.weightsync.sender import STALL_PROBE_S, WeightSender, WeightSyncConfig, WeightSyncError

TEXTS = ["What is 17 + 25?", "Name a color.", "Count to five:", "The capital of France is", "def add(a, b):"]
T = TypeVar("T")
SEEDED = SamplingSpec(n=2, temperature=1.0, max_tokens=10, seed=123)
GREEDY = SamplingSpec(n=1, temperature=0.0, max_tokens=10)


# ---------------------------------------------------------------- without servers


@pytest.mark.parametrize(("n", "weights", "sizes"), [
    (5, [1, 1], [3, 2]), (8, [1, 1], [4, 4]), (7, [2, 1], [5, 2]), (1, [1, 1, 1], [1, 0, 0]),
    (10, [1, 3], [3, 7]), (0, [1, 2], [0, 0]), (4, [0, 1], [0, 4]),
])
def test_a_batch_is_split_in_proportion_to_data_parallel_sizes(n, weights, sizes):
    bounds = split_by_weight(n, weights)
    assert [b - a for a, b in bounds] == sizes
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))  # contiguous, in order
    with pytest.raises(ValueError, match="positive sum"):
        split_by_weight(n, [0, 0])


def test_one_url_stays_a_string_and_several_become_a_list(tmp_path):
    def parse(*argv: str) -> GRPOConfig:
        return parse_config(GRPOConfig, list(argv), "vroll grpo", "")

    one = parse("--vllm_server_base_url", "http://a:1")
    assert one.vllm_server_base_url == "http://a:1" and one.server_urls == ["http://a:1"]
    two = parse("--vllm_server_base_url", "http://a:1", "http://b:2")
    assert two.vllm_server_base_url == ["http://a:1", "http://b:2"] == two.server_urls
    assert two.server_url == "http://a:1" and not two.launches_server
    (tmp_path / "c.yaml").write_text("vllm_server_base_url: [http://a:1, http://b:2]\n")
    assert parse("--config", str(tmp_path / "c.yaml")).server_urls == ["http://a:1", "http://b:2"]
    (tmp_path / "one.yaml").write_text("vllm_server_base_url: http://a:1\n")
    assert parse("--config", str(tmp_path / "one.yaml")).vllm_server_base_url == "http://a:1"
    assert GRPOConfig().server_urls == ["http://127.0.0.1:8000"]
    with pytest.raises(ValueError, match="names a server twice"):
        GRPOConfig(vllm_server_base_url=["http://a:1", "http://a:1"])
    with pytest.raises(ValueError, match="at least one URL"):
        GRPOConfig(vllm_server_base_url=[])


# ---------------------------------------------------------------- two real servers

@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    started = start_servers(tmp_path_factory.mktemp("pool"), 2, "--data-parallel-size", "1")
    yield started
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def prompts(model_path: str) -> list[PromptInput]:
    from transformers import AutoTokenizer

    return encode_prompts(AutoTokenizer.from_pretrained(model_path), TEXTS, None)


def make_pool(servers: list[ServerProcess]) -> ServerPool:
    return ServerPool([s.url for s in servers], None, 60, WeightSyncConfig(bucket_mb=32))


def alone(server: ServerProcess, prompts: list[PromptInput], sampling: SamplingSpec) -> Rollout:
    one = ServerGenerator(server.url, None, 60, WeightSyncConfig())
    try:
        return one.generate(prompts, sampling)
    finally:
        one.close()


def same_samples(a: Rollout, b: Rollout) -> bool:
    return (a.prompt_ids, a.completion_ids, a.texts) == (b.prompt_ids, b.completion_ids, b.texts)


def counting(pool: ServerPool) -> list[list[int]]:
    """Record how many prompts each server's client is sent (the real calls still go out)."""
    sent: list[list[int]] = [[] for _ in pool.servers]
    for i, server in enumerate(pool.servers):
        real = server.client.generate
        server.client.generate = lambda p, s, real=real, i=i: (sent[i].append(len(p)), real(p, s))[1]  # type: ignore[method-assign]
    return sent


@pytest.mark.slow
def test_two_servers_give_what_one_gives_seeded_and_greedy(servers, prompts):
    pool = make_pool(servers)
    sent = counting(pool)
    try:
        one = {}
        for sampling in (SEEDED, GREEDY):
            one[sampling] = alone(servers[0], prompts, sampling)
            two = pool.generate(prompts, sampling)
            assert same_samples(one[sampling], two), sampling
            flat = [x for row in two.sampling_logps for x in row]
            # bf16: the same tokens in another batch (3 + 2 prompts against 5) differ by up to ~1e-2 (measured
            # 0.012 once in a full run); other weights are off by 0.3 and more (test_sync_e2e)
            assert flat == pytest.approx([x for row in one[sampling].sampling_logps for x in row], abs=3e-2)
            assert two.weight_versions == one[sampling].weight_versions  # fresh servers: the pool counts as they do
        assert sent == [[3, 3], [2, 2]]  # both servers served, 3 + 2 prompts of each batch
        # first_index: a share of a batch is sampled as within the whole batch
        tail = pool.generate(prompts[2:], SEEDED, first_index=2)
        assert tail.completion_ids == one[SEEDED].completion_ids[2 * SEEDED.n:]
        # negative control: without the seed shift, the second server's range is sampled differently
        unshifted = alone(servers[1], prompts[3:], SEEDED)
        assert unshifted.completion_ids != one[SEEDED].completion_ids[3 * SEEDED.n:]
    finally:
        pool.close()


@pytest.mark.slow
def test_a_push_reaches_every_server_and_one_that_fails_leaves_then_rejoins(servers, prompts, hf_model, caplog):
    a, b = servers
    versions = [s.client().info().weight_version for s in servers]
    pool = make_pool(servers)
    sent = counting(pool)
    try:
        before = pool.generate(prompts, GREEDY)
        stats = pool.push_weights(perturbed(hf_model, 0.1, seed=1))
        assert stats.weight_version == pool.weight_version == versions[0] + 1
        assert [s.client().info().weight_version for s in servers] == [v + 1 for v in versions]
        after = pool.generate(prompts, GREEDY)
        assert after.completion_ids != before.completion_ids  # the new weights serve
        for server in servers:  # every server got them (bucket by bucket, both groups)
            assert same_samples(alone(server, prompts, GREEDY), after)
        assert set(after.weight_versions) == {stats.weight_version}
        assert pool.metrics() == {"pool/servers_live": 2.0, "pool/servers": 2.0}

        # another trainer takes b's session: b refuses the pool's next push and leaves; a takes it alone
        intruder = WeightSender(b.client(), WeightSyncConfig())
        intruder.connect(force=True)
        with caplog.at_level(logging.WARNING):
            pool.push_weights(perturbed(hf_model, 0.1, seed=2))
        assert pool.live() == [0] and pool.metrics()["pool/servers_live"] == 1.0
        assert f"{b.url} left the pool (weight sync failed: server refused" in caplog.text
        counts = [len(x) for x in sent]
        only_a = pool.generate(prompts, GREEDY)
        assert [len(x) for x in sent] == [counts[0] + 1, counts[1]]  # b gets no prompts
        assert same_samples(only_a, alone(a, prompts, GREEDY))

        # b is free and ready again: the next push includes it, and it rejoins once it took it
        intruder.close()
        with caplog.at_level(logging.WARNING):
            third = pool.push_weights(hf_model)
        assert pool.live() == [0, 1] and f"{b.url} is back" in caplog.text
        both = pool.generate(prompts, GREEDY)
        assert [len(x) for x in sent] == [counts[0] + 2, counts[1] + 1]
        assert same_samples(both, alone(b, prompts, GREEDY)) and both.completion_ids != only_a.completion_ids
        assert set(both.weight_versions) == {third.weight_version} and third.weight_version == stats.weight_version + 2
    finally:
        pool.close()


@pytest.mark.slow
def test_a_push_no_server_takes_is_an_error(servers, hf_model, caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=576, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3))
    pool = make_pool(servers)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(WeightSyncError, match="reached no server"):
            pool.push_weights(other)
        assert pool.live() == []
        assert sum("left the pool" in r.message for r in caplog.records) == 2
        with pytest.raises(Exception, match="no server of the pool is left"):
            pool.generate([PromptInput([1, 2, 3])], GREEDY)
    finally:
        pool.close()


def processes(server: ServerProcess, with_main: bool) -> list[psutil.Process]:
    """A server's engine processes (its replicas and theirs), and the server itself if ``with_main``."""
    main = psutil.Process(server.process.pid)
    return ([main] if with_main else []) + main.children(recursive=True)


def then_pause(call: Callable[..., T], procs: list[psutil.Process]) -> Callable[..., T]:
    """``call``, then SIGSTOP ``procs``: alive, connections open, nothing read or answered (a hung host)."""
    def paused_after(*args: object, **kwargs: object) -> T:
        out = call(*args, **kwargs)
        for p in procs:
            p.suspend()
        return out
    return paused_after


@pytest.mark.slow
def test_a_push_waits_for_a_slow_server_and_drops_a_silent_one_in_seconds(servers, prompts, hf_model, caplog):
    """A broadcast stalls on a server whose workers neither read nor close their connection; gloo
    would wait out the group's timeout (30 s here; 600 s by default). Its engine paused while it
    answers HTTP: the push waits for it. The whole server paused once it accepted the push: it
    leaves within seconds and the other server takes the push; resumed, it serves what it had."""
    a, b = servers
    pool = ServerPool([a.url, b.url], None, 60, WeightSyncConfig(bucket_mb=32, timeout_s=30))
    try:
        pool.push_weights(hf_model)
        engine = processes(b, with_main=False)
        for p in engine:
            p.suspend()
        resume = threading.Timer(3 * STALL_PROBE_S, lambda: [p.resume() for p in engine])
        resume.daemon = True
        resume.start()
        start = time.monotonic()
        waited = pool.push_weights(perturbed(hf_model, 0.05, seed=3))
        assert time.monotonic() - start >= 2 * STALL_PROBE_S and pool.live() == [0, 1]  # slow, not gone
        kept, served = b.client().info().weight_version, alone(a, prompts, GREEDY)

        everything = processes(b, with_main=True)
        client = pool.servers[1].client
        client.weights_update = then_pause(client.weights_update, everything)  # type: ignore[method-assign]
        try:
            with caplog.at_level(logging.WARNING):
                start = time.monotonic()
                pool.push_weights(hf_model)
                took = time.monotonic() - start
        finally:
            for p in everything:
                p.resume()
        assert pool.live() == [0] and took < 15, took
        assert f"{b.url} left the pool (weight sync failed: broadcast of bucket 0 failed: the server " \
               "stopped answering" in caplog.text
        assert a.client().info().weight_version == waited.weight_version + 1
        assert same_samples(alone(b, prompts, GREEDY), served) and b.client().info().weight_version == kept
        assert not same_samples(alone(a, prompts, GREEDY), served)  # control: a serves the new weights
    finally:
        pool.close()


@pytest.mark.slow
def test_a_run_goes_on_when_one_of_two_servers_is_killed(servers, prompts, tmp_path):
    """``vroll grpo`` against two servers; one is killed (SIGKILL, all its processes) once step 1 is logged.

    The run generates asynchronously (one producer thread calling the pool, pushes only while it is
    idle), so the same run shows async generation working on a pool; a synchronous run makes the same
    calls (generate, push_weights) from the main thread.
    """
    a, b = servers
    versions = [s.client().info().weight_version for s in servers]
    watcher = make_pool(servers)  # holds both; after the kill it must send b's prompts to a
    cmd = [sys.executable, "-m", "vroll", "grpo", "--vllm_server_base_url", a.url, b.url, "--max_steps", "3",
           "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
           "--dataset_size", "64", "--seed", "3", "--save_final_model", "false", "--save_only_model", "true",
           "--async_generation", "true", "--max_staleness", "1", "--output_dir", str(tmp_path)]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    try:
        assert wait_for(lambda: (tmp_path / "metrics.jsonl").exists() or run.poll() is not None, timeout=300)
        os.killpg(b.process.pid, signal.SIGKILL)  # the server and its engine processes (one session)
        killed_at = time.monotonic()
        out, _ = run.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack: where the run hangs
        out, _ = run.communicate(timeout=30)
        pytest.fail(f"the run hangs after the kill; its log and stacks:\n{out[-12000:]}")
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-4000:]
    assert b.process.wait(10) == -signal.SIGKILL
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["pool/servers_live"] == 2.0 and rows[-1]["pool/servers_live"] == 1.0
    assert [r["async/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]  # the schedule held through the kill
    assert f"{b.url} left the pool" in out and "1 of 2 servers serve from now on" in out
    # a took every push: before the first generation, after steps 1 and 2, and at the end
    assert a.client().info().weight_version == versions[0] + 4
    assert time.monotonic() - killed_at < 120  # no sync or request waited out a long timeout
    # the pool made before the kill: b's share of a batch goes to a, sampled as a alone samples it
    try:
        assert same_samples(watcher.generate(prompts, SEEDED), alone(a, prompts, SEEDED))
        assert watcher.live() == [0]
    finally:
        watcher.close()
