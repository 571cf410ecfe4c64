"""Batch arithmetic: the few rules that several layers compute, written once.

- **Seeds.** Prompt ``i`` of a request seeded with ``seed`` samples with ``seed + i``
  (:func:`prompt_seed`): a server's replicas, a pool's servers and a trainer's processes each
  take a contiguous range of a batch and continue its seeds, so what a prompt samples does not
  depend on how the batch is split. Generation batch ``g`` of a run seeded ``s`` is seeded with
  ``s * 100_003 + g`` (:func:`generation_seed`); turn ``t`` of a multi-turn episode with
  ``seed + t * 1_000_003`` (:func:`turn_seed`), so no two turns share a seed.
- **Splits.** ``n`` items over parts in proportion to weights (:func:`split_by_weight`), with
  one rounding rule: largest remainders get the items left over, ties go to the earlier part.
  Equal parts (:func:`split_evenly`) and a process's share (:func:`process_slice`) are the
  special case of equal weights.
- **Work.** A request's work is ``n x (prompt + max_tokens)`` tokens summed over its prompts
  (:func:`request_work`): what the server caps, and what a client splits a batch by
  (:func:`split_by_budget`).
- **Weight versions.** :data:`UNKNOWN_VERSION` for weights a trainer never pushed.
- **Context.** The engine's context is a prompt plus a completion (:func:`context_length`).
"""

from __future__ import annotations

from collections.abc import Sequence

GENERATION_SEED_STRIDE = 100_003
TURN_SEED_STRIDE = 1_000_003
UNKNOWN_VERSION = -1  # a server weight version this trainer neither found at start nor pushed: infinitely stale


def prompt_seed(seed: int | None, index: int) -> int | None:
    """The seed of prompt ``index`` of a request (or batch) seeded with ``seed``; None stays unseeded."""
    return None if seed is None else seed + index


def generation_seed(seed: int, generation: int) -> int:
    """The sampling seed of generation batch ``generation`` of a run seeded with ``seed``."""
    return seed * GENERATION_SEED_STRIDE + generation


def turn_seed(seed: int | None, turn: int) -> int | None:
    """The seed of turn ``turn`` of the episodes of a batch seeded with ``seed``."""
    return None if seed is None else seed + turn * TURN_SEED_STRIDE


def split_by_weight(n: int, weights: Sequence[int]) -> list[tuple[int, int]]:
    """``n`` items as contiguous ``(start, stop)`` ranges, one per weight, sized in proportion to the
    weights (largest remainders get the items left over; ties go to the earlier range)."""
    total = sum(weights)
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    sizes = [n * w // total for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(n * weights[i] % total), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """``n`` items over ``parts`` contiguous ranges as even as possible (the earlier ones one longer)."""
    return split_by_weight(n, [1] * parts)


def process_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Process ``rank``'s contiguous share ``(start, stop)`` of ``n`` items over ``world_size`` processes."""
    return split_evenly(n, world_size)[rank]


def request_work(prompt_lengths: Sequence[int], n: int, max_tokens: int) -> int:
    """The tokens a request may cost at most: each prompt's ``n`` sequences of prompt plus completion."""
    return n * (sum(prompt_lengths) + len(prompt_lengths) * max_tokens)


def split_by_budget(prompt_lengths: Sequence[int], n: int, max_tokens: int, max_work: int,
                    max_items: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` ranges of the prompts, each within ``max_work`` tokens of
    :func:`request_work` and ``max_items`` prompts (a cap of 0 is none). A prompt over the budget
    alone is a range of its own (the server's answer then says why)."""
    ranges: list[tuple[int, int]] = []
    start, work = 0, 0
    for i, length in enumerate(prompt_lengths):
        cost = request_work((length,), n, max_tokens)
        full = (max_work and work + cost > max_work) or (max_items and i - start >= max_items)
        if full and i > start:
            ranges.append((start, i))
            start, work = i, 0
        work += cost
    if len(prompt_lengths) > start:
        ranges.append((start, len(prompt_lengths)))
    return ranges


def context_length(max_prompt_length: int | None, max_completion_length: int) -> int | None:
    """The engine context a run needs: a prompt and its completion (None: no prompt limit, the model's own)."""
    return max_prompt_length + max_completion_length if max_prompt_length else None
