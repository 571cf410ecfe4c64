"""Which prompts a generation batch samples, and how: the plan the synchronous and the async path share.

Generation batch ``g`` takes the next prompts of a seeded epoch order over the rows
(:class:`PromptSampler`, whose position is part of a checkpoint) and samples them with
``seed * 100_003 + g`` (``vroll.batching.generation_seed``): a resumed run, or an async one that
plans ahead, plans the very batches an uninterrupted synchronous run plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vroll.batching import generation_seed
from vroll.generation.prompts import encode_prompts
from vroll.protocol import PromptInput, SamplingSpec
from vroll.rows import images_of, prompt_of


@dataclass
class Planned:
    """Generation batch ``index``: its prompts and how to sample them."""

    index: int  # seeds the sampling (seed * 100_003 + index, as in a synchronous run)
    rows: list[int]  # the prompts' dataset rows
    prompts: list[PromptInput]
    sampling: SamplingSpec
    sampler_before: dict[str, int]  # the prompt sampler's position before these rows were taken


@dataclass
class PromptSampler:
    """Seeded epochs over the rows; its position is part of a checkpoint."""

    num_rows: int
    seed: int
    epoch: int = 0
    index: int = 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def take(self, n: int) -> list[int]:
        """The next ``n`` row indices, moving into the next epoch when needed."""
        out: list[int] = []
        order = self._order()
        while len(out) < n:
            if self.index == self.num_rows:
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            take = min(n - len(out), self.num_rows - self.index)
            out += order[self.index : self.index + take]
            self.index += take
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


class Planner:
    """Plans generation batches over ``rows`` (see the module docstring).

    Args:
        rows: the dataset.
        sampler: the epoch order over them (its position moves with every plan).
        tokenizer: renders each prompt (chat prompts through the chat template).
        prompts_per_batch: prompts of one generation batch, over all processes.
        max_prompt_length: prompts are left-truncated to it (a prompt with images is refused instead).
        sampling: how every batch samples (``n``, ``max_tokens``, temperature, ...); its seed is the batch's.
        seed: the run's seed.
    """

    def __init__(self, rows: list[dict[str, Any]], sampler: PromptSampler, tokenizer: Any, prompts_per_batch: int,
                 max_prompt_length: int | None, sampling: SamplingSpec, seed: int) -> None:
        self.rows = rows
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.prompts_per_batch = prompts_per_batch
        self.max_prompt_length = max_prompt_length
        self.sampling = sampling
        self.seed = seed

    def plan(self, index: int) -> Planned:
        """Generation batch ``index``: the next prompts, and the sampling seeded by the index."""
        before = self.sampler.state()
        indices = self.sampler.take(self.prompts_per_batch)
        prompts = encode_prompts(self.tokenizer, [prompt_of(self.rows[i]) for i in indices], self.max_prompt_length,
                                 [images_of(self.rows[i]) for i in indices])
        sampling = SamplingSpec(**{**self.sampling.model_dump(), "seed": generation_seed(self.seed, index)})
        return Planned(index, indices, prompts, sampling, before)
