"""Issue 25, item 2: one client's flood cannot hold another client's small request (fair scheduling).

The flood asks for 1,024 sequences at once, four times the 256 a CPU engine decodes together, so
most of it queues in the engine. First come, first served, a small request sent meanwhile waits
behind the whole queue: ``benchmarks/soak.py --only flood --server-flags '--fair-scheduling false'``
measured its latency at 0.49 of the flood's time (the negative control, docs/performance.md). With
``vroll serve``'s default, vLLM's priority policy by work class (``vroll.engine.vllm_adapter.work_class``),
it is served between the flood's steps. The shared tiny-model server keeps the flood short.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from vroll.engine.vllm_adapter import work_class
from vroll.protocol import GenerateJob, PromptInput, SamplingSpec

pytestmark = pytest.mark.slow


def test_work_class_orders_by_requested_tokens():
    def job(prompts: int, n: int, max_tokens: int) -> GenerateJob:
        return GenerateJob([PromptInput(token_ids=[1, 2, 3])] * prompts, SamplingSpec(n=n, max_tokens=max_tokens), 0)

    assert work_class(job(1, 1, 8)) < work_class(job(256, 4, 16)) < work_class(job(16_384, 8, 512))
    assert work_class(job(1, 1, 8)) == work_class(job(1, 1, 9))  # one size class: arrival order


def test_small_requests_are_served_during_another_clients_flood(tiny_served):
    url = tiny_served.url
    flood = {"prompts": [f"Flood {i}:" for i in range(256)], "n": 4, "max_tokens": 24, "ignore_eos": True,
             "seed": 1}
    latencies: list[float] = []
    with httpx.Client(timeout=300) as small, ThreadPoolExecutor(1) as ex:
        t0 = time.perf_counter()
        big = ex.submit(httpx.post, f"{url}/generate", json=flood, timeout=300)
        time.sleep(1.0)  # the flood is queued in the engine
        while not big.done():
            s0 = time.perf_counter()
            r = small.post(f"{url}/generate", json={"prompts": ["Hi"], "max_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200, r.text
            latencies.append(time.perf_counter() - s0)
            time.sleep(0.2)
        flood_s = time.perf_counter() - t0
        assert big.result().status_code == 200
    assert len(latencies) >= 3, (latencies, flood_s)
    assert statistics.median(latencies) < 0.25 * flood_s, (latencies, flood_s)
