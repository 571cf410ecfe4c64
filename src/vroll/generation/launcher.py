"""The guide's layout: training on N-1 GPUs, and vLLM on the last one, started by the trainer.

With ``--use_vllm true``, server mode and no server address (no ``--vllm_server_base_url``,
``--vllm_server_host`` or ``--vllm_server_port``), the main process first asks the default
address (``http://127.0.0.1:8000``) for ``/health``, and every process follows its answer:

- a vroll server answers (ready or still starting): the trainer trains against it and syncs it,
  as TRL's trainer does with the server of ``trl vllm-serve`` (the two-command flow)::

      CUDA_VISIBLE_DEVICES=0 vroll vllm-serve --model smollm2-135m
      CUDA_VISIBLE_DEVICES=1,2,3,4 accelerate launch train.py

- nothing answers, or something that is not a vroll server (a 404, say): the guide's layout, training
  on N-1 GPUs and vLLM on the last one, started by the trainer::

      torchrun --nproc_per_node 7 -m vroll grpo --use_vllm true --vllm_gpu_memory_utilization 0.7 ...

  The main process starts ``vroll serve`` on the last visible GPU, which no training process uses
  (process ``r`` of a node trains on GPU ``r``), with the trainer's engine flags
  (``--vllm_gpu_memory_utilization``, ``--vllm_dtype``, ...: its ``EngineConfig``, :func:`server_flags`);
  the trainer then connects and syncs to it as to any server. Without a spare GPU it refuses, saying to
  launch one process fewer or to use colocate. Without GPUs it starts a CPU server the same way.

One INFO line says which, and why.

The server dies with the trainer however the trainer ends (``vroll.launch``): normal
exit and Ctrl-C stop it from an ``atexit`` hook, and the kernel sends it SIGTERM when the
trainer dies any other way (a crash, SIGTERM, SIGKILL), so no server outlives its trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import broadcast_object_list

from vroll.engine.config import EngineConfig, serve_flags

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vroll.launch import ServerProcess

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 2.0  # a server on this host answers /health at once, even while its engine loads


def spare_gpu(num_visible: int, local_processes: int, visible_env: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value of the last visible GPU, if no training process uses it."""
    if num_visible <= local_processes:
        raise ValueError(
            f"no spare GPU for vLLM: {local_processes} training process(es) on this node use all {num_visible} "
            f"visible GPU(s). Launch one process fewer (torchrun --nproc_per_node {max(1, num_visible - 1)}: the "
            f"last GPU is left to vLLM), or use --vllm_mode colocate, or start `vroll serve` yourself and pass "
            f"--vllm_server_base_url")
    if visible_env:
        return visible_env.split(",")[num_visible - 1].strip()
    return str(num_visible - 1)


def server_flags(model: str, seed: int, engine: EngineConfig, on_cpu: bool = False) -> list[str]:
    """``vroll serve`` flags for the trainer's model, seed and engine (``args.vllm``: the ``--vllm_*`` flags).

    Not its tensor-parallel size (the server gets one spare GPU) nor sleep mode (a server never sleeps).
    A CPU server starts eager: vLLM's CPU compile took 325 s before SmolLM2-135M served (2 cores), past the
    default ``--vllm_server_timeout`` of 240 s, and a CPU server is for trying things out.
    """
    from vroll.models import resolve_model

    if on_cpu:
        engine = dataclasses.replace(engine, enforce_eager=True)
    return ["--model", resolve_model(model), "--seed", str(seed),
            *serve_flags(engine, skip=("tensor_parallel_size", "enable_sleep_mode"))]


class SpareServer:
    """The ``vroll serve`` this trainer started (main process only); ``wait`` before connecting."""

    def __init__(self, server: ServerProcess, timeout_s: float) -> None:
        self.server = server
        self.timeout_s = timeout_s

    @property
    def url(self) -> str:
        return self.server.url

    def wait(self) -> None:
        """Until the server is ready; if it exits or times out, stop it and raise with its log tail."""
        from vroll.client import ServerUnavailable
        from vroll.launch import ServerExited

        try:
            self.server.wait_ready(self.timeout_s)
        except (ServerExited, ServerUnavailable) as exc:
            self.server.stop()
            what = (f"exited with code {exc.code}" if isinstance(exc, ServerExited) else
                    f"was not ready after {self.timeout_s:.0f} s (--vllm_server_timeout)")
            raise ValueError(f"the vLLM server the trainer started {what}; log tail ({self.server.log}):"
                             f"\n{self.server.log_tail()}") from None
        log.info("vLLM server ready at %s (log: %s)", self.url, self.server.log)

    def stop(self) -> None:
        self.server.stop()


def probe_server(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a vroll server answers at ``url`` (ready or starting), else why not (for the log line)."""
    import httpx
    from pydantic import ValidationError

    from vroll.protocol import HealthResponse

    try:
        resp = httpx.get(f"{url}/health", timeout=timeout_s)
    except httpx.TransportError as exc:
        return f"no server at {url} ({type(exc).__name__})"
    try:  # a vroll server says ok / starting / unhealthy, with its replicas, on 200 or 503
        HealthResponse.model_validate_json(resp.content)
    except ValidationError:
        return f"{url} answers, but not as a vroll generation server (GET /health: HTTP {resp.status_code})"
    return None


def find_server(url: str, accelerator: Accelerator) -> str | None:
    """None if a vroll server answers at ``url``, else why not. The main process asks, every process follows
    its answer (so all agree)."""
    box = [probe_server(url) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    if box[0] is None and accelerator.is_main_process:
        log.info("found a generation server at %s: training against it (no address given; its weights follow the "
                 "policy's)", url)
    return box[0]


def start_spare_server(flags: list[str], output_dir: str | Path, timeout_s: float,
                       accelerator: Accelerator, why: str = "no server address given") -> SpareServer | None:
    """Start ``vroll serve FLAGS`` on the spare GPU (the guide's layout); returns it on the main process.

    Every process checks for a spare GPU (so all refuse together); the main process starts the
    server without waiting (it comes up while the model loads): :meth:`SpareServer.wait` before connecting.
    """
    env = {}
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        env["CUDA_VISIBLE_DEVICES"] = spare_gpu(torch.cuda.device_count(), local,
                                                os.environ.get("CUDA_VISIBLE_DEVICES"))
    if not accelerator.is_main_process:
        return None
    from vroll.launch import launch_server

    log_path = Path(output_dir) / "vllm-server.log"
    server = launch_server(flags, log_path, env=env, ready_timeout_s=None)
    where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if env else "CPU"
    log.info("%s: started vroll serve on %s at %s (log: %s)", why, where, server.url, log_path)
    return SpareServer(server, timeout_s)
