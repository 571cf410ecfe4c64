"""``TransformersGenerator``: ``generate()`` on the policy itself, no vLLM at all.

The trainer's plain mode (``--use_vllm false``: the baseline, and a debugging aid) and
``vroll eval``'s transformers backend.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from vroll.batching import prompt_seed
from vroll.generation.rollout import Rollout
from vroll.protocol import Completion, GenerateResult, PromptInput, PromptResult, SamplingSpec
from vroll.vision import ImageCodec, VisionBatch


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
            torch.manual_seed(prompt_seed(sampling.seed, first_index))
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

    def push_weights(self, model: torch.nn.Module) -> None:
        self.version += 1  # generate() runs on the policy itself: always current

    def end_sync(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

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
