"""``--vllm_lora_sync adapter`` on the real CPU engine: a colocated engine serves a LoRA adapter pushed alone, in
memory, and what it serves is the merged model's distribution.

The engine runs in its own process (``lora_probe.py``: a colocated engine joins a ``torch.distributed``
world and binds threads). Bounds as tests/trainer/test_colocate.py's: bf16 serving leaves greedy logprobs
within 0.1 nats, or a twentieth of the distance to the wrong model where that is larger.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_tiny_model, read_metrics
from vroll.engine.config import EngineConfig, lora_rank_for
from vroll.trainer.config import GRPOConfig

HERE = Path(__file__).parent


def run_probe(out: Path, *flags: str) -> None:
    proc = subprocess.run([sys.executable, str(HERE / "lora_probe.py"), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("lora")
    run_probe(out)
    return json.loads((out / "probe.json").read_text())


def close(gap: float, control: float) -> bool:
    return gap < max(0.1, control / 20)


@pytest.mark.slow
def test_pushed_adapter_serves_the_merged_model(probe: dict) -> None:
    # negative control: before the push the engine serves the base weights, far from the merged model
    assert probe["before_vs_merged1"] > 1.0, probe
    assert close(probe["after1_vs_merged1"], probe["before_vs_merged1"]), probe
    assert probe["after1_vs_merged1_mean"] < 0.05, probe
    assert probe["after1_vs_base"] > 1.0, probe  # the adapter is applied, not ignored
    assert probe["push1"]["tensors"] == 28  # A and B of 7 linear layers x 2 layers, nothing else
    assert probe["push1"]["bytes"] < 100_000


@pytest.mark.slow
def test_second_push_replaces_the_adapter(probe: dict) -> None:
    assert close(probe["after2_vs_merged2"], probe["after2_vs_merged1"]), probe
    assert probe["after2_vs_merged1"] > 1.0, probe  # not the first adapter any more, nor both stacked
    assert probe["adapters"] == [[2]], probe  # the worker holds the new version alone
    assert probe["versions"] == [2, 2]


@pytest.mark.slow
def test_rank_above_the_engines_max_names_both_flags(probe: dict) -> None:
    error = probe["rank_error"]
    assert error is not None and "--lora_r" in error and "--max-lora-rank" in error, error


@pytest.mark.slow
def test_target_modules_vllm_cannot_serve_are_refused_and_the_adapter_kept(probe: dict) -> None:
    error = probe["unsupported_error"]
    assert error is not None and "embed_tokens" in error and "--vllm_lora_sync merged" in error, error
    assert probe["kept_after_errors"] < 0.1, probe  # the refused pushes left the second adapter serving


@pytest.mark.slow
def test_grpo_with_adapter_sync_serves_the_merged_final_adapter(tmp_path: Path) -> None:
    """Two GRPO steps (``use_peft``, ``vllm_lora_sync="adapter"``, colocate, tiny model, vowel_share) at a
    learning rate that moves the adapter far from zero: the engine serves the merged final policy, not the base."""
    run_probe(tmp_path, "--grpo")
    record = json.loads((tmp_path / "grpo.json").read_text())
    assert record["vs_base"] > 1.0, record  # the control: training moved the policy well past rounding
    assert close(record["vs_merged"], record["vs_base"]), record
    assert record["sync_bytes"] < 100_000, record  # the adapter alone, not the 2-layer model


def test_engine_config_turns_lora_on_with_one_adapter_slot() -> None:
    assert "enable_lora" not in EngineConfig().vllm_kwargs()
    kwargs = EngineConfig(enable_lora=True, max_lora_rank=32).vllm_kwargs()
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, 32, 1)
    with pytest.raises(ValueError, match="max-lora-rank must be one of"):
        EngineConfig(max_lora_rank=12)
    assert [lora_rank_for(r) for r in (1, 2, 16, 17, 64)] == [1, 8, 16, 32, 64]


@pytest.mark.parametrize(("kw", "message"), [
    (dict(vllm_mode="colocate"), "add --use_peft"),
    (dict(use_peft=True, use_vllm=False), "needs --use_vllm"),
    (dict(use_peft=True, deepspeed=str(HERE.parents[1] / "configs" / "zero3.json")), "ZeRO-3"),
])
def test_adapter_sync_is_refused_where_it_cannot_work(tmp_path: Path, kw: dict, message: str) -> None:
    args = GRPOConfig(output_dir=str(tmp_path), vllm_lora_sync="adapter", **kw)
    with pytest.raises(ValueError, match=message):
        args.validate(1)


def test_colocated_engine_is_sized_for_the_adapters_rank(tmp_path: Path) -> None:
    args = GRPOConfig(output_dir=str(tmp_path), vllm_mode="colocate", use_peft=True, lora_r=24,
                      vllm_lora_sync="adapter")
    config = args.colocate_engine_spec("m", "m").config
    assert config.enable_lora and config.max_lora_rank == 32
    merged = GRPOConfig(output_dir=str(tmp_path), vllm_mode="colocate", use_peft=True)
    assert not merged.colocate_engine_spec("m", "m").config.enable_lora


@pytest.mark.slow
def test_vroll_grpo_adapter_sync_from_the_command_line_trains_as_the_merged_sync(tmp_path: Path) -> None:
    """``vroll grpo --use_peft --vllm_lora_sync adapter`` (colocate, tiny model, vowel_share), next to the same
    run with the merged sync: the engine's sampling logprobs stay as close to the trainer's (``is/mismatch_k3_kl``,
    measured 0.0174 adapter vs 0.0178 merged at step 2, where the policy has moved) and the rewards agree."""
    folder = make_tiny_model(tmp_path / "tiny")
    rows = {}
    for mode in ("merged", "adapter"):
        out = tmp_path / mode
        cmd = [sys.executable, "-m", "vroll", "grpo", "--model_name_or_path", str(folder), "--vllm_mode", "colocate",
               "--vllm_enforce_eager", "true", "--vllm_kv_cache_memory_gib", "0.25", "--use_peft", "--lora_r", "8",
               "--lora_target_modules", "all-linear", "--vllm_lora_sync", mode, "--max_steps", "2",
               "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "8",
               "--reward_funcs", "vowel_share", "--learning_rate", "0.05", "--dataset_size", "32",
               "--output_dir", str(out), "--save_final_model", "false", "--save_only_model", "true"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[mode] = read_metrics(out)
    for mode, metrics in rows.items():
        assert [r["weight_version"] for r in metrics] == [1.0, 2.0], mode
    merged, adapter = rows["merged"][-1], rows["adapter"][-1]
    assert adapter["is/mismatch_k3_kl"] < 2 * merged["is/mismatch_k3_kl"] + 0.01, (adapter, merged)
    assert abs(adapter["reward/mean"] - merged["reward/mean"]) < 0.05, (adapter, merged)
