"""``--vllm_lora_sync adapter`` against ``vroll serve --enable-lora`` (DP=2, tiny model, real CPU engine): the
adapter's factors alone go over the bucketed gloo push to both replicas, and every request then runs with it.

One module-level server (the shared ``server_tiny`` has LoRA off). Bounds as tests/engine/test_lora_adapter.py's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import bf16_copy, make_tiny_model, served_logprob_gaps, start_server
from vroll.generation.server import ServerGenerator
from vroll.launch import ServerProcess
from vroll.protocol import SamplingSpec
from vroll.weightsync.sender import WeightSyncConfig, WeightSyncError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from lora_probe import PROMPTS, adapted, merged  # noqa: E402

pytestmark = pytest.mark.slow

GREEDY = SamplingSpec(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("lora-server")
    folder = make_tiny_model(root / "tiny")
    server = start_server(root, "--model", str(folder), "--data-parallel-size", "2", "--enable-lora",
                          "--max-lora-rank", "8")
    yield server, folder
    server.stop()


@pytest.fixture(scope="module")
def base(lora_server: tuple[ServerProcess, Path]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lora_server[1], dtype=torch.float32).eval()


def served(server: ServerProcess):  # noqa: ANN201
    return server.client().generate(PROMPTS * 2, GREEDY)  # 4 prompts: both replicas get some


def test_adapter_push_reaches_every_replica_and_serves_the_merged_model(lora_server, base) -> None:
    server, _ = lora_server
    gen = ServerGenerator(server.url, None, 60, WeightSyncConfig(timeout_s=60))
    gen.lora_sync = "adapter"
    first, second = adapted(base, 8, seed=1), adapted(base, 8, seed=2)
    try:
        assert gen.info.max_lora_rank == 8
        control = float(served_logprob_gaps(merged(first), served(server)).max())
        assert control > 1.0  # negative control: before the push the server serves the base weights
        stats = gen.push_weights(first)
        assert stats.num_tensors == 28 and stats.num_bytes < 100_000  # the factors, not the model
        gap = float(served_logprob_gaps(merged(first), served(server)).max())
        assert gap < max(0.1, control / 20), (gap, control)
        gen.push_weights(second)
        out = served(server)
        gap2 = float(served_logprob_gaps(merged(second), out).max())
        stale = float(served_logprob_gaps(merged(first), out).max())
        assert stale > 1.0 and gap2 < max(0.1, stale / 20), (gap2, stale)  # replaced, not stacked
    finally:
        gen.close()


def test_a_rank_above_the_servers_is_refused_at_start_naming_both_flags(lora_server) -> None:
    from vroll.trainer.generators import check_adapter_servers

    server, _ = lora_server
    gen = ServerGenerator(server.url, None, 60, WeightSyncConfig(timeout_s=60))
    try:
        with pytest.raises(ValueError, match=r"--lora_r 16 is above the max LoRA rank 8 .*--max-lora-rank 16"):
            check_adapter_servers([gen], 16)
        check_adapter_servers([gen], 8)
    finally:
        gen.close()


def test_a_rank_above_the_servers_fails_the_push_and_keeps_the_adapter(lora_server, base) -> None:
    server, _ = lora_server
    gen = ServerGenerator(server.url, None, 60, WeightSyncConfig(timeout_s=60))
    gen.lora_sync = "adapter"
    try:
        before = served(server)
        with pytest.raises(WeightSyncError, match="max LoRA rank 8"):
            gen.push_weights(adapted(base, 16, seed=3))
        after = served(server)
        assert [c.token_ids for r in after.results for c in r.completions] == \
            [c.token_ids for r in before.results for c in r.completions]
    finally:
        gen.close()


def test_grpo_with_adapter_sync_against_the_server(lora_server, base, tmp_path) -> None:
    """Two GRPO steps (``use_peft``, ``vllm_lora_sync="adapter"``) against the LoRA server: the final adapter,
    pushed alone, is what both replicas serve (the merged final policy, far from the base model)."""
    from vroll.tasks.addition import addition_splits
    from vroll.trainer.config import GRPOConfig
    from vroll.trainer.grpo import GRPOTrainer

    server, folder = lora_server
    args = GRPOConfig(output_dir=str(tmp_path), vllm_server_base_url=server.url, model_name_or_path=str(folder),
                      max_steps=2, max_completion_length=8, per_device_train_batch_size=8, num_generations=4,
                      learning_rate=0.05, seed=3, reward_funcs=["vowel_share"], use_peft=True, lora_r=8,
                      lora_alpha=16, lora_target_modules=["all-linear"], vllm_lora_sync="adapter",
                      save_final_model=False, save_only_model=True)
    trainer = GRPOTrainer(args=args, train_dataset=addition_splits(seed=2, train_size=64, test_size=0)[0])
    try:
        trainer.train()
        trainer.rollouts.push()  # the final adapter
        assert trainer.rollouts.last_sync.num_bytes < 100_000
        out = served(server)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        control = float(served_logprob_gaps(bf16_copy(base), out).max())
        gap = float(served_logprob_gaps(merged(policy), out).max())
        assert control > 1.0 and gap < max(0.1, control / 20), (gap, control)
    finally:
        trainer.rollouts.generator.close()
