"""Generation backends: who samples the completions the trainer learns from.

- ``ServerGenerator``: a running ``vroll serve`` (HTTP for prompts, a process group
  for weights). Only the trainer's main process holds one; several servers are a
  ``ServerPool`` of them (``vroll.trainer.server_pool``).
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
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch

from vroll.client import GenerationClient, ServerUnavailable
from vroll.environments import EpisodeInfo
from vroll.protocol import Completion, GenerateResult, PromptInput, PromptResult, SamplingSpec
from vroll.vision import ImageCodec, VisionBatch
from vroll.weightsync.sender import SyncStats, WeightSender, WeightSyncConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vroll.trainer.config import TrainConfig
    from vroll.trainer.server_pool import ServerPool

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """``n`` completions per prompt, prompt-major (prompt 0's completions first)."""

    prompt_ids: list[list[int]]  # one entry per completion: the prompt as the model ran it (images expanded)
    completion_ids: list[list[int]]  # a multi-turn episode: everything after its first prompt, every turn
    # per token: 1 = sampled by the policy (trained), 0 = written by an environment (never trained);
    # a single-turn completion is all ones, so the losses have one code path
    completion_mask: list[list[int]]
    texts: list[str]  # what reward functions score: the completion (an episode: the model's last reply)
    sampling_logps: list[list[float]] | None  # the generator's own logprobs (0.0 where the mask is 0), if it has them
    truncated: list[bool]  # stopped by max_tokens, not by EOS/stop
    weight_versions: list[int]  # per completion: the generator's weights that sampled it
    seconds: float
    # one entry per completion: the prompt as sent (one placeholder per image, and the images), which
    # the training forward needs for pixel_values; empty when the rollout was built without them
    prompts: list[PromptInput] = field(default_factory=list)
    # one entry per completion when an environment wrote part of it (vroll.trainer.episodes), else empty
    episodes: list[EpisodeInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        if [len(m) for m in self.completion_mask] != [len(c) for c in self.completion_ids]:
            raise ValueError("completion_mask must have one entry per completion token")

    def __setstate__(self, state: dict[str, Any]) -> None:
        # an async checkpoint written before the mask existed holds single-turn rollouts: all model tokens
        state.setdefault("completion_mask", [[1] * len(c) for c in state["completion_ids"]])
        state.setdefault("episodes", [])
        self.__dict__.update(state)

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    def select(self, rows: list[int]) -> Rollout:
        """These completions, in this order (``seconds`` is kept: the time the whole generation took)."""
        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in rows] if values else []
        return Rollout(**{f.name: pick(getattr(self, f.name)) for f in fields(self) if f.name != "seconds"},
                       seconds=self.seconds)

    @classmethod
    def concat(cls, parts: list[Rollout], seconds: float | None = None) -> Rollout:
        """One rollout of ``parts`` in order. ``seconds``: what generating all of them took (default: the
        longest part's, for parts generated side by side)."""
        def join(name: str) -> list | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else [x for v in values for x in v]
        return cls(**{f.name: join(f.name) for f in fields(cls) if f.name != "seconds"},
                   seconds=max(p.seconds for p in parts) if seconds is None else seconds)

    @property
    def has_images(self) -> bool:
        return any(p.images for p in self.prompts)

    @property
    def weight_version(self) -> int:
        """The oldest weights any completion was sampled with."""
        return min(self.weight_versions)

    @classmethod
    def from_results(cls, out: GenerateResult, seconds: float, prompts: list[PromptInput] | None = None,
                     with_logprobs: bool = True) -> Rollout:
        """From the engine's results (the server's, the colocated engine's, or ``generate()``'s).

        ``prompts``: what was sent, one per result; ``with_logprobs=False``: the generator has no
        sampling logprobs (no importance-sampling correction).
        """
        comps = out.flat()
        bad = next((i for i, c in enumerate(comps) if any(math.isnan(x) for x in c.logprobs)), None)
        if bad is not None:
            raise ValueError(f"completion {bad} has NaN logprobs: the generating model produced NaNs (weights "
                             f"version {out.weight_version} diverged?); lower the learning rate or keep "
                             "max_grad_norm > 0")
        if prompts is not None and len(prompts) != len(out.results):
            raise ValueError(f"{len(out.results)} results for {len(prompts)} prompts")
        sent = [p for p, r in zip(prompts, out.results, strict=True) for _ in r.completions] if prompts else []
        return cls([r.prompt_token_ids for r in out.results for _ in r.completions], [c.token_ids for c in comps],
                   [[1] * len(c.token_ids) for c in comps], [c.text for c in comps],  # every token sampled
                   [c.logprobs for c in comps] if with_logprobs else None,
                   [c.finish_reason == "length" for c in comps], [out.weight_version] * len(comps), seconds, sent)


class Generator(Protocol):
    """``first_index``: global index of ``prompts[0]``. A server seeds each prompt (``seed + index``),
    so a process that generates only its share samples what one process would have; the colocated
    engine seeds its whole batch with ``seed + first_index`` (reproducible, no per-request
    generators; see ``ColocateGenerator``). ``local``: each training process generates its own share
    (else only the main one calls).
    """

    local: bool

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout: ...

    def sync_weights(self, model: torch.nn.Module) -> SyncStats | None: ...

    def close(self) -> None: ...


def text_tokenizer(processing: Any) -> Any:
    """The tokenizer of a tokenizer or of a processor (a vision-language model's ``AutoProcessor``)."""
    from transformers import ProcessorMixin

    return processing.tokenizer if isinstance(processing, ProcessorMixin) else processing


def encode_prompts(tokenizer: Any, prompts: list[Any], max_length: int | None,
                   images: list[tuple[Any, ...]] | None = None, tools: list[dict] | None = None) -> list[PromptInput]:
    """Each prompt as token ids (chat prompts through the chat template), left-truncated, with its images.

    The chat template renders each ``{"type": "image"}`` part as ONE image placeholder token (the
    engine, or the trainer's :class:`~vroll.vision.ImageCodec`, expands it). A prompt with
    images is never truncated (that could cut an image away): over ``max_length``, it is an error.
    ``tools``: JSON schemas for the chat template to render (``--tools``).
    """
    out = []
    for i, p in enumerate(prompts):
        imgs = tuple(images[i]) if images else ()
        if isinstance(p, str):
            ids = tokenizer(p).input_ids
        else:
            schemas = {"tools": tools} if tools else {}  # only where asked: not every template API takes it
            text = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False, **schemas)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        if max_length and len(ids) > max_length:
            if imgs:
                raise ValueError(f"prompt {i} has {len(ids)} tokens (one per image), over max_prompt_length "
                                 f"{max_length}; a prompt with images is not truncated (that could cut an image "
                                 f"away): raise max_prompt_length")
            ids = ids[-max_length:]
        out.append(PromptInput(ids, imgs))
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
        out = self.client.generate(prompts, sampling)  # images, where there are any, go as base64 PNG
        return Rollout.from_results(out, time.perf_counter() - start, prompts, sampling.return_logprobs)

    def sync_weights(self, model: torch.nn.Module) -> SyncStats:
        return self.sync.push(model)

    def end_sync(self) -> None:
        """End the sync session (the server keeps serving the last weights)."""
        self.sync.close()

    def close(self) -> None:
        self.sync.close()
        self.client.close()


class TransformersGenerator:
    """``model.generate()``: the trainer's plain mode (on the policy) and ``vroll eval``'s transformers backend.

    Greedy at temperature 0. A completion ends at the first token of the full EOS set (the
    generation config's EOS ids and the tokenizer's), which it keeps, as vLLM does; one that
    reaches ``max_tokens`` first is truncated (``finish_reason="length"``). Prompts with images
    go through the model's image processor (``images``), expanded as the model runs them.
    """

    local = True

    def __init__(self, model: torch.nn.Module, tokenizer: Any, autocast: bool = False, batch_size: int = 64,
                 images: ImageCodec | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.codec = images
        self.autocast = autocast
        self.batch_size = batch_size
        self.eos_ids = eos_token_ids(model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(self.eos_ids)
        self.version = 0

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout:
        start = time.perf_counter()
        results = self.results(prompts, sampling, first_index)
        return Rollout.from_results(GenerateResult(results, self.version), time.perf_counter() - start, prompts,
                                    with_logprobs=False)

    @torch.no_grad()
    def results(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> list[PromptResult]:
        """``sampling.n`` completions per prompt, in batches of ``batch_size`` prompts."""
        if sampling.stop:
            raise ValueError("the transformers generator does not support stop strings")
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed + first_index)
        out: list[PromptResult] = []
        for first in range(0, len(prompts), self.batch_size):
            out += self._batch(prompts[first : first + self.batch_size], sampling)
        return out

    def _batch(self, prompts: list[PromptInput], sampling: SamplingSpec) -> list[PromptResult]:
        device = next(self.model.parameters()).device
        images = [self._images(i, p) for i, p in enumerate(prompts)]
        ran = [p.token_ids if im is None else self.codec.expand(p.token_ids, im)
               for p, im in zip(prompts, images, strict=True)]
        width = max(len(p) for p in ran)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in ran], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ran], device=device)
        extra = {}
        if self.codec is not None:
            vision = VisionBatch(images, self.codec.image_token_id).to(device)
            extra = vision.forward_kwargs(self.model, ids, reuse_features=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
            gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_tokens,
                                      num_return_sequences=sampling.n, pad_token_id=self.pad,
                                      eos_token_id=sorted(self.eos_ids), **_sampling_kwargs(sampling), **extra)
        rows = gen[:, width:].tolist()
        n = sampling.n
        return [PromptResult(ran[i], [self._completion(row) for row in rows[i * n : (i + 1) * n]])
                for i in range(len(prompts))]

    def _images(self, index: int, prompt: PromptInput) -> Any:
        if not prompt.images:
            return None
        if self.codec is None:
            raise ValueError(f"prompt {index} has images, but the model takes none (a text-only model)")
        return self.codec.encode(prompt.images)

    def _completion(self, row: list[int]) -> Completion:
        end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
        kept = row if end is None else row[: end + 1]
        text = self.tokenizer.decode(row if end is None else row[:end], skip_special_tokens=True)
        return Completion(kept, text, [], "length" if end is None else "stop")

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.version += 1  # generate() runs on the policy itself: always current

    def close(self) -> None:
        pass


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a reply: the generation config's EOS id(s) and the tokenizer's."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list | tuple) else [eos]) | {tokenizer.eos_token_id}
    ids.discard(None)
    if not ids:
        raise ValueError("neither the generation config nor the tokenizer names an EOS token")
    return {int(i) for i in ids}


def _sampling_kwargs(s: SamplingSpec) -> dict[str, Any]:
    """``generate()``'s sampling arguments, all explicit (the model's generation config sets none of them)."""
    if s.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p,
            "top_k": s.top_k if s.top_k > 0 else 0,  # 0 disables; None would mean generate()'s default 50
            "min_p": s.min_p or None, "repetition_penalty": s.repetition_penalty}


def make_generator(args: TrainConfig, accelerator: Accelerator, policy: torch.nn.Module,
                   tokenizer: Any) -> Generator | None:
    """The server-mode or plain ``generate()`` generator; ``None`` on processes that do not call it.

    A server (several: a :class:`~vroll.trainer.server_pool.ServerPool`) is reached by the main
    process only, and refused (on every process) when it shares a GPU with any training process.
    """
    if not args.use_vllm:
        return TransformersGenerator(policy, tokenizer, autocast=args.bf16, images=ImageCodec.for_model(policy))
    from vroll.trainer.server_pool import ServerPool  # (it builds on this module)

    generator: ServerGenerator | ServerPool | None = None
    if accelerator.is_main_process:
        key, urls = args.vllm_api_key or os.environ.get("VROLL_API_KEY"), args.server_urls
        generator = (ServerGenerator(urls[0], key, args.vllm_server_timeout, args.weight_sync()) if len(urls) == 1
                     else ServerPool(urls, key, args.vllm_server_timeout, args.weight_sync()))
    _check_server_devices(generator, accelerator)
    return generator


def _check_server_devices(generator: ServerGenerator | ServerPool | None, accelerator: Accelerator) -> None:
    """Refuse (on every process) a server, or a pool's server, that shares a GPU with a training process."""
    from accelerate.utils import broadcast_object_list, gather_object

    from vroll.trainer.devices import gpu_uuid, server_conflict
    from vroll.trainer.server_pool import ServerPool

    many = accelerator.num_processes > 1
    mine = [gpu_uuid(accelerator.device)]
    uuids = gather_object(mine) if many else mine
    servers = [] if generator is None else generator.servers if isinstance(generator, ServerPool) else [generator]
    conflicts = [server_conflict(uuids, s.info.gpu_uuids, s.client.base_url) for s in servers]
    box = [next((c for c in conflicts if c), None)]
    if many:
        broadcast_object_list(box, from_process=0)
    if box[0]:
        if generator is not None:
            generator.close()
        raise ValueError(box[0])
