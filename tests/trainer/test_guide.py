"""The multimodal GRPO guide's training script, with only the entry point changed.

The guide (VLM-R1's "Using VLLM with GRPO Trainer") launches::

    torchrun --nproc_per_node="7" --nnodes="1" --node_rank="0" --master_addr="127.0.0.1" \\
        --master_port="12346" src/open_r1/grpo_rec.py <GUIDE_FLAGS>

vroll's entry point is ``-m vroll grpo``. Its flags and values are copied below (with its
shell variables EXP_NAME, BATCH_SIZE and RUN_NAME filled in): vroll must accept every one.
On CPU the same flags run for 2 steps under ``torchrun --nproc_per_node 2`` with ZeRO-3 and
the guide's layout (the trainer starts the vLLM server itself), with CPU-sized values for the
model, data, batch size and lengths.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from helpers import free_port, make_tiny_model, read_metrics
from vroll.flags import parse_config
from vroll.trainer.config import GRPOConfig

REPO = Path(__file__).resolve().parents[2]
EXP_NAME, BATCH_SIZE, RUN_NAME = "your_experiment_name", "4", "your_run_name"
GUIDE_FLAGS = [
    "--deepspeed", "configs/zero3.json",
    "--output_dir", f"runs/{EXP_NAME}/batch_size_{BATCH_SIZE}",
    "--model_name_or_path", "path/to/your/model",
    "--dataset_name", "data_config/rec.yaml",
    "--image_root", "path/to/image/data",
    "--per_device_train_batch_size", BATCH_SIZE,
    "--gradient_accumulation_steps", "2",
    "--logging_steps", "1",
    "--bf16",
    "--torch_dtype", "bfloat16",
    "--data_seed", "42",
    "--report_to", "wandb",
    "--gradient_checkpointing", "false",
    "--attn_implementation", "flash_attention_2",
    "--num_iterations", "1",
    "--max_steps", "500",
    "--run_name", f"{RUN_NAME}_batch_{BATCH_SIZE}",
    "--save_steps", "500",
    "--save_only_model", "true",
    "--max_prompt_length", "1024",
    "--max_completion_length", "1024",
    "--use_vllm", "true",
    "--vllm_gpu_memory_utilization", "0.7",
    "--vllm_dtype", "bfloat16",
    "--num_generations", "7",
]
GUIDE_PROCESSES = 7  # torchrun --nproc_per_node="7" on an 8-GPU node: the 8th is vLLM's


def test_vroll_accepts_every_flag_of_the_guide(monkeypatch):
    monkeypatch.chdir(REPO)  # --deepspeed configs/zero3.json is relative, as in the guide
    cfg = parse_config(GRPOConfig, GUIDE_FLAGS, "vroll grpo", "")
    assert cfg.deepspeed_config()["zero_optimization"]["stage"] == 3
    assert (cfg.output_dir, cfg.model_name_or_path, cfg.dataset_name, cfg.image_root) == (
        "runs/your_experiment_name/batch_size_4", "path/to/your/model", "data_config/rec.yaml", "path/to/image/data")
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.logging_steps) == (4, 2, 1)
    assert cfg.bf16 is True and cfg.torch_dtype == "bfloat16" and cfg.data_seed == 42 and cfg.report_to == ["wandb"]
    assert cfg.gradient_checkpointing is False and cfg.attn_implementation == "flash_attention_2"
    assert (cfg.num_iterations, cfg.max_steps, cfg.save_steps, cfg.save_only_model) == (1, 500, 500, True)
    assert cfg.run_name == "your_run_name_batch_4"
    assert (cfg.max_prompt_length, cfg.max_completion_length, cfg.num_generations) == (1024, 1024, 7)
    assert cfg.use_vllm and cfg.vllm_gpu_memory_utilization == 0.7 and cfg.vllm_dtype == "bfloat16"
    assert cfg.launches_server  # no server address: the guide's layout, vLLM on the spare GPU
    assert cfg.generation_batch_size(GUIDE_PROCESSES) % cfg.num_generations == 0  # 4 x 7 x 2 = 56 = 8 x 7


def test_an_unknown_flag_stays_a_clear_error(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        parse_config(GRPOConfig, [*GUIDE_FLAGS, "--vllm_dtyp", "bfloat16"], "vroll grpo", "")
    assert "unrecognized arguments: --vllm_dtyp bfloat16 (--vllm_dtyp: did you mean --vllm_dtype?)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):  # no abbreviations: a prefix is not silently another flag
        parse_config(GRPOConfig, ["--vllm_gpu", "0.7"], "vroll grpo", "")
    assert "unrecognized arguments: --vllm_gpu" in capsys.readouterr().err


def with_values(flags: list[str], **values: str) -> list[str]:
    """The guide's flags with some values replaced (same flags, same order)."""
    out = list(flags)
    for name, value in values.items():
        out[out.index(f"--{name}") + 1] = value
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "vlm"])
def test_the_guide_script_runs_on_cpu_with_zero3_and_its_own_server(kind, tmp_path):
    """``torchrun --nproc_per_node 2 ... -m vroll grpo <the guide's flags>``, 2 steps: ZeRO-3 over
    gloo, vLLM started by the trainer (no server address given) and stopped when it exits."""
    if kind == "vlm":  # the tiny VLM and the synthetic REC data
        from vroll.tasks.rec import make_synthetic_rec
        from vroll.testing import build_tiny_vlm

        model = str(build_tiny_vlm(tmp_path / "model"))
        dataset = str(make_synthetic_rec(tmp_path / "rec", n=56, seed=0))
    else:
        model, dataset = str(make_tiny_model(tmp_path / "model")), "addition"
    wandb = importlib.util.find_spec("wandb") is not None
    flags = with_values(
        GUIDE_FLAGS, deepspeed=str(REPO / "configs/zero3.json"), output_dir=str(tmp_path / "run"),
        model_name_or_path=model, dataset_name=dataset, image_root=str(tmp_path / "rec"),
        per_device_train_batch_size="7",  # BATCH_SIZE=7: 7 x 2 processes x 2 = 28, whole groups of 7
        report_to="wandb" if wandb else "none", max_steps="2", save_steps="1", max_completion_length="16")
    cpu_engine = ["--vllm_enforce_eager", "true", "--vllm_kv_cache_memory_gib", "0.5", "--vllm_server_timeout", "900"]
    port = str(free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--node_rank", "0",
           "--master_addr", "127.0.0.1", "--master_port", port, "-m", "vroll", "grpo", *flags, *cpu_engine]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["weight_version"] > rows[0]["weight_version"]
    assert "flash_attention_2: flash-attn is not installed" in log and "using sdpa" in log
    assert "started vroll serve on CPU" in log
    if kind == "vlm":  # grpo_rec.py hard-codes IoU + format: vroll picks them for REC data, no flag needed
        assert "reward_funcs not given: rec_iou rec_format" in log
        assert {"reward/rec_iou/mean", "reward/rec_format/mean"} <= set(rows[0])
    assert (tmp_path / "run/final/model.safetensors").is_file()  # save_only_model: a plain HF folder
    assert not (tmp_path / "run/checkpoint-1/sharded").exists()
    if wandb:
        assert "wandb:" in log and "logging offline" in log
        assert list((tmp_path / "run/wandb").glob("offline-run-*"))
    url = re.search(r"started vroll serve on CPU at (http://\S+)", log).group(1)
    port_flag = url.rsplit(":", 1)[1]
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and "serve" in p.info["cmdline"] and port_flag in p.info["cmdline"]]
    assert not leftovers, "the trainer's vLLM server outlived it"
