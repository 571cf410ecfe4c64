"""ModelSource on a model sharded over two processes (ZeRO-3, FSDP2; gloo on CPU): every tensor
comes back whole, in checkpoint names and full shapes, LoRA merged per bucket (compared with
PEFT's own merge_and_unload), and the model stays sharded after the gathers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("peft")
REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests/weightsync/sharded_probe.py"

LAUNCH = {
    "zero3": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(PROBE),
              "--deepspeed", str(REPO / "configs/zero3.json")],
    "fsdp2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/fsdp2.yaml"),
              "--num_processes", "2", str(PROBE)],
}


@pytest.mark.slow  # two processes over gloo: 20-60 s
@pytest.mark.parametrize("kind", ["zero3", "fsdp2"])
def test_sharded_lora_model_gathers_bucket_by_bucket(kind, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([*LAUNCH[kind], "--out", str(tmp_path), "--lora"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["world"] == 2 and out["sharded"] and out["still_sharded"]
    assert sorted(out["names"]) == out["expected_names"]  # checkpoint names, no lora_/base_layer leftovers
    assert out["shapes"] == out["expected_shapes"]  # full shapes, declared without gathering
    worst = max(out["max_error"], key=out["max_error"].get)
    assert out["max_error"][worst] < 1e-5, worst  # q_proj/v_proj: W + B @ A * scale, like PEFT's merge
