"""Generation backends: who samples the completions the trainer learns from.

- ``ServerGenerator``: a running ``vroll serve`` (HTTP for prompts, a process group
  for weights). Only the trainer's main process holds one.
- ``TransformersGenerator``: ``generate()`` on the policy itself, no vLLM at all (the
  baseline, and a debugging aid).
- ``ColocateGenerator`` (``vroll.trainer.colocate``): a vLLM engine inside each
  training process.

Both take prompt token ids and return a typed :class:`Rollout`; the trainer never
sees which one produced it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from vroll.client import GenerationClient, ServerUnavailable
from vroll.protocol import GenerateResult, PromptInput, SamplingSpec
from vroll.weightsync.sender import SyncStats, WeightSender, WeightSyncConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vroll.trainer.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """``n`` completions per prompt, prompt-major (prompt 0's completions first)."""

    prompt_ids: list[list[int]]  # one entry per completion (prompts repeated n times)
    completion_ids: list[list[int]]
    texts: list[str]
    sampling_logps: list[list[float]] | None  # the generator's own logprobs, if it has them
    truncated: list[bool]  # stopped by max_tokens, not by EOS/stop
    weight_versions: list[int]  # per completion: the generator's weights that sampled it
    seconds: float

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @property
    def weight_version(self) -> int:
        """The oldest weights any completion was sampled with."""
        return min(self.weight_versions)

    @classmethod
    def from_results(cls, out: GenerateResult, seconds: float) -> Rollout:
        """From the engine's results (the server's, or the colocated engine's)."""
        comps = out.flat()
        bad = next((i for i, c in enumerate(comps) if any(math.isnan(x) for x in c.logprobs)), None)
        if bad is not None:
            raise ValueError(f"completion {bad} has NaN logprobs: the generating model produced NaNs (weights "
                             f"version {out.weight_version} diverged?); lower the learning rate or keep "
                             "max_grad_norm > 0")
        return cls([r.prompt_token_ids for r in out.results for _ in r.completions], [c.token_ids for c in comps],
                   [c.text for c in comps], [c.logprobs for c in comps], [c.finish_reason == "length" for c in comps],
                   [out.weight_version] * len(comps), seconds)


class Generator(Protocol):
    """``first_index``: global index of ``prompts[0]``; per-prompt seeds are ``seed + index``,
    so a process that generates only its share samples what one process would have.
    ``local``: each training process generates its own share (else only the main one calls).
    """

    local: bool

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout: ...

    def sync_weights(self, model: torch.nn.Module) -> SyncStats | None: ...

    def close(self) -> None: ...


def encode_prompts(tokenizer: Any, prompts: list[Any], max_length: int | None) -> list[PromptInput]:
    """Each prompt as token ids (chat prompts through the chat template), left-truncated."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = tokenizer(p).input_ids
        else:
            text = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        out.append(PromptInput(ids[-max_length:] if max_length else ids))
    return out


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

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout:
        start = time.perf_counter()  # the server numbers prompts itself: one caller sends them all
        out = self.client.generate([p.token_ids for p in prompts], sampling)
        return Rollout.from_results(out, time.perf_counter() - start)

    def sync_weights(self, model: torch.nn.Module) -> SyncStats:
        return self.sync.push(model)

    def close(self) -> None:
        self.sync.close()
        self.client.close()


class TransformersGenerator:
    """``model.generate()`` on the policy: no server, no weight sync, slower."""

    local = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any, autocast: bool) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.autocast = autocast
        self.version = 0

    @torch.no_grad()
    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout:
        start = time.perf_counter()
        prompt_ids = [p.token_ids for p in prompts]
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompt_ids)
        device = next(self.model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
        starts = torch.tensor([width - len(p) for p in prompt_ids], device=device)
        mask = (torch.arange(width, device=device)[None, :] >= starts[:, None]).long()
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed + first_index)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else None,
                max_new_tokens=sampling.max_tokens, num_return_sequences=sampling.n, pad_token_id=pad)
        completions, truncated = self._cut(out[:, width:].tolist())
        prompts = [p for p in prompt_ids for _ in range(sampling.n)]
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return Rollout(prompts, completions, texts, None, truncated, [self.version] * len(completions),
                       time.perf_counter() - start)

    def _cut(self, rows: list[list[int]]) -> tuple[list[list[int]], list[bool]]:
        eos = self.tokenizer.eos_token_id
        out, truncated = [], []
        for row in rows:
            end = row.index(eos) + 1 if eos in row else len(row)
            out.append(row[:end])
            truncated.append(eos not in row)
        return out, truncated

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.version += 1  # generate() runs on the policy itself: always current

    def close(self) -> None:
        pass


def make_generator(args: TrainConfig, accelerator: Accelerator, policy: torch.nn.Module,
                   tokenizer: Any) -> Generator | None:
    """The server-mode or plain ``generate()`` generator; ``None`` on processes that do not call it.

    A server is reached by the main process only, and refused (on every process) when it
    shares a GPU with any training process.
    """
    if not args.use_vllm:
        return TransformersGenerator(policy, tokenizer, autocast=args.bf16)
    generator = None
    if accelerator.is_main_process:
        key = args.vllm_api_key or os.environ.get("VROLL_API_KEY")
        generator = ServerGenerator(args.server_url, key, args.vllm_server_timeout, args.weight_sync())
    _check_server_devices(generator, accelerator, args.server_url)
    return generator


def _check_server_devices(generator: ServerGenerator | None, accelerator: Accelerator, url: str) -> None:
    from accelerate.utils import broadcast_object_list, gather_object

    from vroll.trainer.devices import gpu_uuid, server_conflict

    many = accelerator.num_processes > 1
    mine = [gpu_uuid(accelerator.device)]
    uuids = gather_object(mine) if many else mine
    box = [None if generator is None else server_conflict(uuids, generator.info.gpu_uuids, url)]
    if many:
        broadcast_object_list(box, from_process=0)
    if box[0]:
        if generator is not None:
            generator.close()
        raise ValueError(box[0])
