"""``Rollout``: the completions of one generation batch, as every generator returns them.

``n`` completions per prompt, prompt-major. A single-turn completion is the engine's reply; a
multi-turn episode (``vroll.generation.episodes``) is everything after its first prompt, the
environment's tokens masked out of training (``completion_mask``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from vroll.environments import EpisodeInfo
from vroll.protocol import GenerateResult, PromptInput


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
    # one entry per completion when an environment wrote part of it (vroll.generation.episodes), else empty
    episodes: list[EpisodeInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        if [len(m) for m in self.completion_mask] != [len(c) for c in self.completion_ids]:
            raise ValueError("completion_mask must have one entry per completion token")

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
