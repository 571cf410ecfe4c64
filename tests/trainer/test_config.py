"""Trainer configs: one source of truth for option sets, batch arithmetic, secrets kept out of logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vroll.flags import parse_config
from vroll.rl.losses import DPO_LOSS_TYPES, LOSS_TYPES
from vroll.trainer.bookkeeping.artifacts import RunArtifacts
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
    assert (spec.model, spec.served_name, spec.config.max_model_len, spec.config.gpu_memory_utilization, spec.seed) == (
        "/models/x", "x", 128, 0.5, 7)
    assert spec.distributed_executor_backend == "external_launcher"
    # one generation batch per engine: 8 x 4 completions on one process; a TP-2 engine on 4 processes
    # decodes its two processes' shares of 64 x 4
    one = GRPOConfig(per_device_train_batch_size=32, num_generations=4)
    tp2 = GRPOConfig(per_device_train_batch_size=32, num_generations=4, vllm_tensor_parallel_size=2)
    assert (one.colocate_engine_spec("/m", "m").max_num_seqs, tp2.colocate_engine_spec("/m", "m", 4).max_num_seqs) \
        == (32, 64)


def test_api_key_is_redacted_in_the_saved_config(tmp_path):
    cfg = GRPOConfig(output_dir=str(tmp_path), vllm_api_key="s3cret-key")
    RunArtifacts(tmp_path, True, ["none"], None, cfg.redacted()).close()
    saved = (tmp_path / "config.json").read_text()
    assert "s3cret-key" not in saved and json.loads(saved)["vllm_api_key"] == "***"
    assert cfg.vllm_api_key == "s3cret-key"  # the trainer itself still uses it
    assert GRPOConfig(output_dir=str(tmp_path)).redacted()["vllm_api_key"] is None  # nothing to hide


# --- the training stack's flags (issue 16) ---

REPO = Path(__file__).resolve().parents[2]


def test_deepspeed_auto_values_come_from_the_trainer_flags():
    from vroll.trainer.model.distributed import fill_deepspeed_config

    cfg = GRPOConfig(deepspeed=str(REPO / "configs/zero3.json"), per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, max_grad_norm=0.5, num_generations=4)
    ds = fill_deepspeed_config(cfg, world_size=7)
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 2, 4 * 2 * 7)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] == "auto"  # accelerate fills bf16 from --bf16
    zero = ds["zero_optimization"]
    hidden = 576  # the embedded SmolLM2's hidden size, read from its config
    assert (zero["reduce_bucket_size"], zero["stage3_param_persistence_threshold"]) == (hidden * hidden, 10 * hidden)
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # every checkpoint is an HF folder
    offload = fill_deepspeed_config(GRPOConfig(deepspeed=str(REPO / "configs/zero3_offload.json")), 1)
    assert offload["zero_force_ds_cpu_optimizer"] is False  # vroll's AdamW runs on the CPU copy


def test_bad_deepspeed_configs_fail_at_parse_time(tmp_path):
    with pytest.raises(ValueError, match="--deepspeed nope.json: no such file"):
        GRPOConfig(deepspeed="nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 3")
    with pytest.raises(ValueError, match="not valid JSON"):
        GRPOConfig(deepspeed=str(bad))
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="remove its optimizer section"):
        GRPOConfig(deepspeed=str(bad))
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="ZeRO-3 over several processes"):
        GRPOConfig(deepspeed=str(bad), use_vllm=False).validate(num_processes=2)
    GRPOConfig(deepspeed=str(bad), use_vllm=False).validate(num_processes=1)  # one process generates alone


def test_flash_attention_2_falls_back_to_sdpa_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with caplog.at_level("WARNING"):
        assert GRPOConfig(attn_implementation="flash_attention_2").attn_backend() == "sdpa"
    assert caplog.text.count("\n") == 1 and "flash-attn is not installed; using sdpa" in caplog.text
    assert GRPOConfig(attn_implementation="eager").attn_backend() == "eager"


def test_lora_flags_use_trls_names_and_become_a_peft_config():
    pytest.importorskip("peft")
    from vroll.trainer.model.lora import lora_config

    cfg = parse_config(GRPOConfig, ["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.1",
                                    "--lora_target_modules", "q_proj", "v_proj", "--lora_task_type", "CAUSAL_LM"],
                       "vroll grpo", "")
    peft_cfg = lora_config(cfg)
    assert cfg.use_peft and (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout) == (8, 16, 0.1)
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"} and peft_cfg.task_type == "CAUSAL_LM"
    all_linear = parse_config(GRPOConfig, ["--use_peft", "--lora_target_modules", "all-linear"], "vroll grpo", "")
    assert lora_config(all_linear).target_modules == "all-linear"
    with pytest.raises(ValueError, match="lora_r >= 1"):
        GRPOConfig(lora_r=0)


def test_reward_weights_are_checked_against_the_functions_given_or_defaulted(tmp_path):
    with pytest.raises(ValueError, match=r"reward_weights has 1 entries for 2 reward_funcs \(a b\)"):
        GRPOConfig(reward_funcs=["a", "b"], reward_weights=[1.0])
    # no --reward_funcs: the check waits for the data's default (addition: two functions)
    config = GRPOConfig(reward_weights=[1.0], output_dir=str(tmp_path), use_vllm=False)
    from vroll.trainer.grpo import GRPOTrainer

    with pytest.raises(ValueError, match=r"1 entries for 2 reward_funcs \(addition_correct addition_format\)"):
        GRPOTrainer(args=config)


def test_environment_flags_from_the_command_line_and_yaml(tmp_path):
    cfg = parse_config(GRPOConfig, ["--environment", "calculator", "--max_turns", "3"], "vroll grpo", "")
    assert (cfg.environment, cfg.max_turns) == ("calculator", 3)
    path = tmp_path / "run.yaml"
    path.write_text("environment: mymodule:make_env\nmax-turns: 5\n")
    cfg = parse_config(GRPOConfig, ["--config", str(path)], "vroll grpo", "")
    assert (cfg.environment, cfg.max_turns) == ("mymodule:make_env", 5)
    assert GRPOConfig().environment is None  # single-turn unless asked


@pytest.mark.parametrize(("kw", "message"), [
    (dict(environment="calculater"), "give 'package.module:factory' or a built-in \\(calculator\\)"),
    (dict(environment="calculator", max_turns=0), "max_turns must be >= 1"),
    (dict(environment="calculator", vllm_mode="colocate", vllm_tensor_parallel_size=2), "tensor-parallel"),
])
def test_environment_config_errors_say_what_to_do(kw, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**kw)


def test_bf16_falls_back_to_float32_only_on_a_cpu_without_native_bf16(monkeypatch, caplog):
    """Emulated bf16 autocast is ~27x slower than fp32 on an AVX2 CPU: --bf16 trains fp32 there, with a warning;
    on a GPU, or a CPU with AVX512-BF16/AMX, it stays bf16 (the control)."""
    from vroll.trainer.model import distributed

    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="vroll"):
        assert distributed.mixed_precision(True, cuda=False) == "no"
    assert "no native bf16" in caplog.text
    assert distributed.mixed_precision(True, cuda=True) == "bf16"
    assert distributed.mixed_precision(False, cuda=False) == "no"
    monkeypatch.setattr(distributed, "native_cpu_bf16", lambda: True)
    assert distributed.mixed_precision(True, cuda=False) == "bf16"


@pytest.mark.parametrize(("kw", "message"), [
    (dict(max_tokens_per_micro_batch=100, max_prompt_length=256, max_completion_length=64),
     "max_tokens_per_micro_batch 100 is below the longest row .* = 320"),
    (dict(max_tokens_per_micro_batch=1000, gradient_accumulation_steps=2, steps_per_generation=3),
     "steps_per_generation \\(3\\) must be a multiple of gradient_accumulation_steps \\(2\\)"),
    (dict(logps_chunk_tokens=-1), "logps_chunk_tokens must be >= 0"),
])
def test_user_scale_flags_fail_at_parse_time_naming_the_flag(kw, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(output_dir="runs/x", **kw)
    # control: the defaults parse, and a budget that fits the longest row does
    assert GRPOConfig(output_dir="runs/x", max_tokens_per_micro_batch=320).padding_free


# --- importance sampling against vLLM (issue 29): TRL 1.16's flag names, and the old cap as an alias ---


def test_importance_sampling_flags_use_trls_names():
    cfg = parse_config(GRPOConfig, ["--vllm_importance_sampling_mode", "sequence_mask", "--vllm-importance-sampling-"
                                    "clip-max", "inf", "--vllm_importance_sampling_clip_min", "0.5"], "vroll grpo", "")
    correction = cfg.vllm_importance_sampling
    assert (correction.mode, correction.bounds) == ("sequence_mask", (0.5, math.inf))
    default = GRPOConfig().vllm_importance_sampling  # vroll's behaviour before the modes
    assert (default.mode, default.clip_max, default.clip_min) == ("token_truncate", 2.0, None)
    with pytest.raises(SystemExit):
        parse_config(GRPOConfig, ["--vllm_importance_sampling_mode", "sequence"], "vroll grpo", "")


def test_the_old_cap_is_an_alias_of_clip_max():
    assert GRPOConfig(vllm_importance_sampling_cap=3.0).vllm_importance_sampling.clip_max == 3.0
    assert GRPOConfig(vllm_importance_sampling_cap=3.0, vllm_importance_sampling_clip_max=3.0
                      ).vllm_importance_sampling.clip_max == 3.0
    cfg = parse_config(GRPOConfig, ["--vllm_importance_sampling_cap", "4"], "vroll grpo", "")
    assert cfg.vllm_importance_sampling_clip_max == 4.0  # the saved config.json holds the value in use
    with pytest.raises(ValueError, match="vllm_importance_sampling_cap \\(3.0\\) is the old name of "
                                         "vllm_importance_sampling_clip_max \\(5.0\\): give one of them"):
        GRPOConfig(vllm_importance_sampling_cap=3.0, vllm_importance_sampling_clip_max=5.0)
    with pytest.raises(ValueError, match="vllm_importance_sampling_clip_min \\(None\\) must be <= 1 <= "
                                         "vllm_importance_sampling_clip_max \\(0.5\\)"):
        GRPOConfig(vllm_importance_sampling_cap=0.5)  # the alias goes through the same checks
