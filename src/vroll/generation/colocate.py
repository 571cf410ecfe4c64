"""Colocate mode: a vLLM engine inside each training process, on its own device.

For users with one GPU (or who want no second process). Each training process owns
an engine built with vLLM's ``external_launcher`` backend, which joins the training
job's ``torch.distributed`` world: the engine sits on the process's own device, and
with ``vllm_tensor_parallel_size`` T, each T consecutive ranks form one
tensor-parallel engine (every member feeds it the group's prompts and keeps its own
completions).

A sync is a function call, not a transfer: the trainer's tensors (cast to the
serving dtype, LoRA merged, gathered bucket by bucket) are handed to the worker by
reference and loaded through the same ``Worker.reload_weights`` path as in server
mode. With sleep mode the engine gives its GPU memory back between generations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from vroll.engine.config import EngineSpec
from vroll.generation.rollout import Rollout
from vroll.protocol import GenerateJob, GenerateResult, PromptInput, SamplingSpec
from vroll.weightsync.buckets import plan_buckets, to_dtype
from vroll.weightsync.sender import SyncStats, WeightSyncError, nonfinite_names
from vroll.weightsync.source import ModelSource, adapter_push
from vroll.world import ensure_distributed_env

log = logging.getLogger(__name__)


class ColocateGenerator:
    """Completions from an in-process vLLM engine; weights loaded by reference.

    Sampling is seeded per generation batch (``seed + first_index`` of the TP group's batch), not
    per prompt as on a server: the same run, resumed or not, samples the same completions, and a
    decode step does not pay vLLM's per-request generator loop (``VLLMEngine.generate``).

    Args:
        spec: the engine (model path, dtype, memory share, TP size, sleep mode).
        bucket_mb: how much of the model is gathered at once when syncing (ZeRO-3/FSDP2).
        seed_per_prompt: seed each prompt as a server does instead (the completions then do not
            depend on how the batch is split among processes, nor on the mode), at vLLM's
            per-request cost.
        lora_sync: ``"adapter"``: a LoRA policy's factors alone are handed over (the engine, built with
            ``enable_lora``, serves the base checkpoint it loaded plus that adapter); ``"merged"``: every
            weight, the adapters added in.
    """

    local = True

    def __init__(self, spec: EngineSpec, bucket_mb: float, seed_per_prompt: bool = False,
                 lora_sync: str = "merged") -> None:
        from vroll.engine.vllm_adapter import VLLMEngine

        ensure_distributed_env()
        self.tp = spec.config.tensor_parallel_size
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.seed_per_prompt = seed_per_prompt
        self.lora_sync = lora_sync
        self.tp_group = self._tp_group(self.tp)
        start = time.perf_counter()
        self.engine = VLLMEngine(spec)
        dtype = self.engine.info().dtype
        self.dtype = to_dtype(dtype)
        self.version = 0
        log.info("colocated vLLM engine ready in %.0f s (%s, TP=%d)", time.perf_counter() - start, dtype, self.tp)
        self.engine.sleep()

    @staticmethod
    def _tp_group(tp: int) -> Any:
        """This rank's tensor-parallel group (consecutive ranks, as vLLM forms them)."""
        if tp == 1:
            return None
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        if world % tp:
            raise ValueError(f"vllm_tensor_parallel_size {tp} must divide the number of processes {world}")
        mine = None
        for first in range(0, world, tp):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(first, first + tp)))
            if first <= rank < first + tp:
                mine = group
        return mine

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout:
        """Completions for this process's prompts (its TP group generates the group's together)."""
        start = time.perf_counter()
        group, offset, first = self._group_prompts(prompts, first_index)
        try:
            # one seed per batch unless asked: vLLM's per-request generators loop on every decode step
            job = GenerateJob(group, sampling, first)
            results = self.engine.generate(job, batch_seeded=not self.seed_per_prompt)  # wakes the engine
        finally:
            self.engine.sleep()
        mine = results[offset : offset + len(prompts)]
        return Rollout.from_results(GenerateResult(mine, self.version), time.perf_counter() - start, prompts,
                                    sampling.return_logprobs)

    def _group_prompts(self, prompts: list[PromptInput], first_index: int) -> tuple[list[PromptInput], int, int]:
        """All prompts of the TP group, where this rank's start, and the group's first index."""
        if self.tp_group is None:
            return prompts, 0, first_index
        import torch.distributed as dist

        parts: list[Any] = [None] * self.tp
        dist.all_gather_object(parts, (prompts, first_index), group=self.tp_group)
        me = dist.get_rank(self.tp_group)
        offset = sum(len(p) for p, _ in parts[:me])
        return [prompt for p, _ in parts for prompt in p], offset, parts[0][1]

    def push_weights(self, model: torch.nn.Module) -> SyncStats:
        """Load the model's current weights into the engine; returns what moved."""
        if self.lora_sync == "adapter":
            return self._push_adapter(model)
        start = time.perf_counter()
        source = ModelSource(model, self.dtype)
        plan = plan_buckets(source.metadata(), self.bucket_bytes)
        try:
            with source.session():
                self.engine.load_weights(_stream(source, plan))  # wakes the engine
        finally:
            self.engine.sleep()
        self.version += 1
        return SyncStats(sum(b.nbytes for b in plan), sum(len(b.tensors) for b in plan), len(plan),
                         time.perf_counter() - start, self.version)

    def _push_adapter(self, model: torch.nn.Module) -> SyncStats:
        """The LoRA factors alone, by reference, as the engine's next adapter version."""
        start = time.perf_counter()
        push = adapter_push(model, self.dtype)
        bad = nonfinite_names(push.tensors)
        if bad:
            raise WeightSyncError(f"the adapter has NaN/inf values in {', '.join(bad[:3])}: training diverged")
        try:
            self.engine.load_lora(push.tensors, push.config)  # wakes the engine
        finally:
            self.engine.sleep()
        self.version += 1
        return SyncStats(push.nbytes, len(push.tensors), 1, time.perf_counter() - start, self.version)

    def end_sync(self) -> None:
        pass  # an engine in this process: no session to end

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        del self.engine


def _stream(source: ModelSource, plan: list) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one bucket gathered at a time (never the whole sharded model)."""
    for bucket in plan:
        with source.gather([t.name for t in bucket.tensors]) as tensors:
            bad = nonfinite_names(tensors)
            if bad:  # the engine is left half-loaded, but a diverged policy cannot go on anyway
                raise WeightSyncError(f"the model has NaN/inf values in {', '.join(bad[:3])}: training diverged "
                                      f"(lower the learning rate, or keep max_grad_norm > 0)")
            yield from tensors.items()
