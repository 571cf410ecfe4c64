"""Trainer configs: one source of truth for option sets, batch arithmetic, secrets kept out of logs."""

from __future__ import annotations

import json

import pytest

from vroll.flags import parse_config
from vroll.rl.losses import DPO_LOSS_TYPES, LOSS_TYPES
from vroll.trainer.artifacts import RunArtifacts
from vroll.trainer.config import GRPOConfig, OnlineDPOConfig


def test_loss_types_come_from_rl_and_become_flag_choices(capsys):
    with pytest.raises(SystemExit):
        parse_config(GRPOConfig, ["--loss_type", "nope"], "vroll grpo", "")
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(repr(t) in err for t in LOSS_TYPES)
    with pytest.raises(SystemExit):
        parse_config(OnlineDPOConfig, ["--loss_type", "dapo"], "vroll online-dpo", "")  # a GRPO type
    err = capsys.readouterr().err
    assert "invalid choice: 'dapo'" in err and all(repr(t) in err for t in DPO_LOSS_TYPES)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOConfig(loss_type="nope")  # type: ignore[arg-type]  # the dataclass checks too


def test_batch_arithmetic_lives_on_the_config():
    grpo = GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=4,
                      num_iterations=3, max_steps=-1, num_train_epochs=1.0)
    assert grpo.completions_per_prompt() == 4
    assert grpo.prompts_per_generation(num_processes=2) == 8 * 2 * 2 // 4
    assert grpo.micro_steps_per_generation() == 2 * 3
    assert grpo.total_steps(num_prompts=64, num_processes=2) == 64 * 6 // (8 * 2)
    with pytest.raises(ValueError, match="divisible by num_generations 4"):
        GRPOConfig(per_device_train_batch_size=3, num_generations=4).validate(num_processes=1)
    dpo = OnlineDPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert (dpo.completions_per_prompt(), dpo.prompts_per_generation(3), dpo.micro_steps_per_generation()) == (2, 24, 2)


def test_component_configs_come_from_the_train_config():
    cfg = GRPOConfig(weight_sync_bucket_mb=64, weight_sync_host="10.0.0.2", max_prompt_length=100,
                     max_completion_length=28, vllm_gpu_memory_utilization=0.5, seed=7)
    sync = cfg.weight_sync()
    assert (sync.bucket_mb, sync.host) == (64, "10.0.0.2")
    spec = cfg.colocate_engine_spec("/models/x", "x")
    assert (spec.model, spec.served_name, spec.max_model_len, spec.gpu_memory_utilization, spec.seed) == (
        "/models/x", "x", 128, 0.5, 7)
    assert spec.distributed_executor_backend == "external_launcher"


def test_api_key_is_redacted_in_the_saved_config(tmp_path):
    cfg = GRPOConfig(output_dir=str(tmp_path), vllm_api_key="s3cret-key")
    RunArtifacts(tmp_path, True, ["none"], None, cfg.redacted()).close()
    saved = (tmp_path / "config.json").read_text()
    assert "s3cret-key" not in saved and json.loads(saved)["vllm_api_key"] == "***"
    assert cfg.vllm_api_key == "s3cret-key"  # the trainer itself still uses it
    assert GRPOConfig(output_dir=str(tmp_path)).redacted()["vllm_api_key"] is None  # nothing to hide
