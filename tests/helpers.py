"""Helpers the tests share (fixtures live in conftest.py): servers, metrics files, polling."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vroll.client import GenerationClient
from vroll.launch import ServerProcess, free_port, launch_server

__all__ = ["Served", "ServerProcess", "free_port", "make_tiny_model", "read_metrics", "start_server", "start_servers",
           "wait_for"]

REPO = Path(__file__).resolve().parents[1]

SERVER_START_TIMEOUT_S = 900


VLM_IMAGE_LIMIT = 2  # server_vlm's --limit-mm-per-prompt
VLM_PIXEL_CAP = 200 * 200  # server_vlm's --max-image-pixels
SERVER_FLAGS = ("--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-gib", "0.5")  # small CPU settings


@dataclass(frozen=True)
class Served:
    """A running server and the model folder it serves: a trainer pointed at it must load the same model."""

    process: ServerProcess
    model: str

    @property
    def url(self) -> str:
        return self.process.url

    def client(self) -> GenerationClient:
        return self.process.client()


def start_server(tmp: Path, *flags: str, api_key: str | None = None) -> ServerProcess:
    """``vroll serve`` (small CPU settings) on a free loopback port, ready to use."""
    log = tmp / f"serve-{len(list(tmp.glob('serve-*.log')))}.log"
    return launch_server([*SERVER_FLAGS, *flags], log, api_key=api_key, ready_timeout_s=SERVER_START_TIMEOUT_S)


def start_servers(tmp: Path, count: int, *flags: str) -> list[ServerProcess]:
    """``count`` servers like :func:`start_server`, started at once (their startups overlap), ready to use.

    Launched from this thread, which outlives them (a server dies with the thread that launched it).
    """
    servers = [launch_server([*SERVER_FLAGS, *flags], tmp / f"serve-{i}.log", ready_timeout_s=None)
               for i in range(count)]
    try:
        for server in servers:
            server.wait_ready(SERVER_START_TIMEOUT_S)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's ``metrics.jsonl``, one dict per logged step."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, poll: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def make_tiny_model(out: Path) -> Path:
    """A tiny random Qwen2-shaped text model (``vroll.testing.build_text_model("tiny")``): seconds to build,
    and its attention heads split in two (the embedded model's 9 do not)."""
    import torch

    from vroll.testing import build_text_model

    with torch.random.fork_rng(devices=[]):  # the build seeds torch: this test process's stream stays as it was
        return build_text_model("tiny", out)


def perturbed(model: Any, scale: float, seed: int) -> Any:
    """A copy with Gaussian noise (``scale`` x each matrix's std) added to every matrix (any device, dtype)."""
    import copy

    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            if p.dim() == 2:
                noise = torch.randn(p.shape, generator=g).to(p.device, torch.float32)
                p.add_((noise * scale * p.float().std()).to(p.dtype))
    return clone


def bf16_copy(model: Any) -> Any:
    """The model as a server holds it after a sync: bf16 weights (float32 compute), in eval mode."""
    import copy

    import torch

    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.copy_(p.bfloat16().float())
    return clone.eval()


def served_logprob_gaps(model: Any, out: Any) -> Any:
    """|``model``'s teacher-forced logprob - the server's| for every completion token of ``out``
    (a ``GenerateResult``), as one 1-D tensor."""
    import torch

    gaps = []
    for r in out.results:
        for c in r.completions:
            with torch.no_grad():
                logits = model(torch.tensor([r.prompt_token_ids + c.token_ids])).logits
            logits = logits[0, len(r.prompt_token_ids) - 1 : -1].float()
            mine = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            gaps.append((mine - torch.tensor(c.logprobs)).abs())
    return torch.cat(gaps)


def assert_served_by(model: Any, out: Any) -> None:
    """``out``'s logprobs are ``model``'s, up to bf16 serving. Measured at temperature 1: mean 0.01-0.06 per
    token (0.06 for a perturbed, high-entropy model), the largest 0.25-0.31, where another model's (two
    perturbations of the embedded one) is 1.2-1.6 on average and up to 5."""
    gaps = served_logprob_gaps(model, out)
    assert gaps.mean() < 0.15 and gaps.max() < 1.0, (float(gaps.mean()), float(gaps.max()))


def max_served_logprob_gap(model: Any, out: Any) -> float:
    """The largest of :func:`served_logprob_gaps`."""
    return float(served_logprob_gaps(model, out).max())
