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

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("lora")
    proc = subprocess.run([sys.executable, str(HERE / "lora_probe.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "probe.json").read_text())


def close(gap: float, control: float) -> bool:
    return gap < max(0.1, control / 20)


def test_pushed_adapter_serves_the_merged_model(probe: dict) -> None:
    # negative control: before the push the engine serves the base weights, far from the merged model
    assert probe["before_vs_merged1"] > 1.0, probe
    assert close(probe["after1_vs_merged1"], probe["before_vs_merged1"]), probe
    assert probe["after1_vs_merged1_mean"] < 0.05, probe
    assert probe["after1_vs_base"] > 1.0, probe  # the adapter is applied, not ignored
    assert probe["push1"]["tensors"] == 28  # A and B of 7 linear layers x 2 layers, nothing else
    assert probe["push1"]["bytes"] < 100_000


def test_second_push_replaces_the_adapter(probe: dict) -> None:
    assert close(probe["after2_vs_merged2"], probe["after2_vs_merged1"]), probe
    assert probe["after2_vs_merged1"] > 1.0, probe  # not the first adapter any more, nor both stacked
    assert probe["adapters"] == [[2]], probe  # the worker holds the new version alone
    assert probe["versions"] == [2, 2]


def test_rank_above_the_engines_max_names_both_flags(probe: dict) -> None:
    error = probe["rank_error"]
    assert error is not None and "--lora_r" in error and "--max-lora-rank" in error, error
