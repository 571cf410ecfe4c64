"""``ServerGenerator``: completions from a running ``vroll serve``; new weights pushed over the sync group.

Only the trainer's main process holds one (the others receive its rollouts by broadcast); several
servers are a ``vroll.generation.pool.ServerPool`` of them. :func:`check_server_devices` refuses, on
every process, a server that shares a GPU with a training process.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from vroll.client import GenerationClient, ServerUnavailable, shifted
from vroll.generation.rollout import Rollout
from vroll.protocol import PromptInput, SamplingSpec
from vroll.weightsync.buckets import to_dtype
from vroll.weightsync.sender import SyncStats, WeightSender, WeightSyncConfig
from vroll.weightsync.source import AdapterSource, adapter_push

if TYPE_CHECKING:
    from accelerate import Accelerator


log = logging.getLogger(__name__)


class ServerGenerator:
    """Completions from a ``vroll serve`` server; new weights pushed over the sync group."""

    local = False

    def __init__(self, url: str, api_key: str | None, ready_timeout: float, sync: WeightSyncConfig) -> None:
        self.client = GenerationClient(url, api_key=api_key)
        try:
            self.client.wait_until_ready(timeout=ready_timeout)
        except ServerUnavailable as exc:
            raise ServerUnavailable(f"{exc.reason}\n(in another terminal, or with other GPUs: "
                                    f"CUDA_VISIBLE_DEVICES=... vroll serve --model <model>)") from None
        self.info = self.client.info()
        self.sync = WeightSender(self.client, sync)
        self.lora_sync = "merged"  # "adapter": a LoRA policy pushes its factors alone (a server with --enable-lora)

    @property
    def servers(self) -> list[ServerGenerator]:
        return [self]

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout:
        start = time.perf_counter()  # images, where there are any, go as base64 PNG
        out = self.client.generate(prompts, shifted(sampling, first_index))
        return Rollout.from_results(out, time.perf_counter() - start, prompts, sampling.return_logprobs)

    def push_weights(self, model: torch.nn.Module) -> SyncStats:
        return self.sync.push(sync_source(model, self.lora_sync, self.info.dtype))

    def end_sync(self) -> None:
        self.sync.close()

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.sync.close()
        self.client.close()


def sync_source(model: torch.nn.Module, lora_sync: str, dtype: str) -> torch.nn.Module | AdapterSource:
    """What a push sends: the model (every weight, LoRA merged in), or its LoRA adapter alone in ``dtype``
    (the servers' serving dtype) for ``lora_sync == "adapter"``."""
    if lora_sync != "adapter":
        return model
    return AdapterSource(adapter_push(model, to_dtype(dtype)))


def check_server_devices(servers: list[ServerGenerator], accelerator: Accelerator) -> None:
    """Refuse (on every process) a server that shares a GPU with a training process (``servers``: the main
    process's, empty on the others)."""
    from accelerate.utils import broadcast_object_list, gather_object

    from vroll.generation.devices import gpu_uuid, server_conflict

    many = accelerator.num_processes > 1
    mine = [gpu_uuid(accelerator.device)]
    uuids = gather_object(mine) if many else mine
    conflicts = [server_conflict(uuids, s.info.gpu_uuids, s.client.base_url) for s in servers]
    box = [next((c for c in conflicts if c), None)]
    if many:
        broadcast_object_list(box, from_process=0)
    if box[0]:
        raise ValueError(box[0])
