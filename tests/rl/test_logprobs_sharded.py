"""Chunked logps through DDP, DeepSpeed ZeRO-3 and FSDP2 (two CPU processes over gloo).

``scoring_forward`` keeps the wrapper's forward in the path, so every parameter's gradient is the
mean over both processes of today's ``completion_logps`` gradient. The two processes score
different numbers of tokens (ZeRO-3 gathers the lm_head once per pass however many chunks each
has). Control: the backbone and the lm_head called from outside the wrapper (the trap
``scoring_forward`` avoids) give DDP a gradient that is not reduced, and FSDP2 an error or a wrong
gradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two-process launches (30-60 s each)
REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests/rl/logps_sharded_probe.py"

LAUNCH = {
    "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(PROBE)],
    "zero3": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(PROBE),
              "--deepspeed", str(REPO / "configs/zero3.json")],
    "fsdp2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/fsdp2.yaml"),
              "--num_processes", "2", "--mixed_precision", "no", str(PROBE)],
}


def probe(kind: str, path: str, tmp_path: Path) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([*LAUNCH[kind], "--out", str(tmp_path), "--path", path], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert (tmp_path / "result.json").exists(), proc.stderr[-4000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.parametrize("kind", ["ddp", "zero3", "fsdp2"])
def test_scoring_forward_gives_the_averaged_gradient_under_every_wrapper(kind, tmp_path):
    if kind == "zero3":
        pytest.importorskip("deepspeed")
    out = probe(kind, "scoring", tmp_path)
    assert out["world"] == 2 and "error" not in out, out.get("error")
    worst = max(out["max_rel_error"], key=out["max_rel_error"].get)
    assert out["max_rel_error"][worst] < 1e-4, (worst, out["max_rel_error"][worst])


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_calling_the_submodules_outside_the_wrapper_is_wrong(kind, tmp_path):
    out = probe(kind, "outside", tmp_path)
    assert "error" in out or max(out["max_rel_error"].values()) > 1e-2, out
