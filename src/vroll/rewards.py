"""Reward functions: resolution from specs, batched scoring, and reward-model wrapper."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import numbers
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from vroll.plugins import import_callable
from vroll.rl.advantages import combine_rewards

RM_PREFIX = "rm:"


class RewardFunc(Protocol):
    """A reward function; may be a plain or an ``async def`` function.

    ``columns`` are the dataset columns, one list per column aligned with ``completions``.
    A function that takes a ``truncated`` parameter (or ``**kwargs``) also gets ``truncated``:
    per completion, True if it was cut at the length limit without ending (no EOS).
    Returns one score per completion; None means "not applicable" to that sample.
    """

    def __call__(
        self, prompts: list[str], completions: list[str], **columns: list[Any]
    ) -> list[float | None] | Awaitable[list[float | None]]: ...


class RewardFunctionError(ValueError):
    """A reward function raised or returned something unusable."""


@dataclass
class RewardScores:
    """Scores of N completions by F reward functions."""

    per_func: Tensor  # (N, F), NaN where a function returned None
    names: list[str]
    total: Tensor  # (N,) weighted sum, NaN entries skipped


def builtin_reward_funcs() -> dict[str, Callable[..., Any]]:
    """Built-in reward functions by name (a fresh dict, so callers cannot mutate a global): every task's
    (``vroll.tasks``), the episodes' own (``environment``) and ``vowel_share`` (speed runs)."""
    from vroll.environments import environment_reward
    from vroll.tasks import task_rewards
    from vroll.tasks.synthetic import vowel_share

    return task_rewards() | {"environment": environment_reward, "vowel_share": vowel_share}


def _resolve_one(spec: str | Callable[..., Any], device: str) -> tuple[str, Callable[..., Any]]:
    """Turn one spec into a (name, callable) pair."""
    if callable(spec):
        return getattr(spec, "__name__", None) or type(spec).__name__, spec
    if spec.startswith(RM_PREFIX):
        return spec, RewardModel.from_pretrained(spec[len(RM_PREFIX) :], device=device)
    if ":" in spec:
        return spec, import_callable(spec)
    builtins = builtin_reward_funcs()
    if spec in builtins:
        return spec, builtins[spec]
    raise ValueError(
        f"unknown reward function {spec!r}; built-ins: {', '.join(sorted(builtins))}; "
        "or use 'package.module:function', 'rm:<model name or path>', or pass a callable"
    )


def resolve_reward_funcs(
    specs: Sequence[str | Callable[..., Any]], *, device: str = "cpu"
) -> list[tuple[str, Callable[..., Any]]]:
    """Resolve reward specs to ``(name, callable)`` pairs.

    A spec is a built-in name (see :func:`builtin_reward_funcs`), ``"package.module:function"``,
    ``"rm:<name_or_path>"`` (a sequence-classification reward model loaded on ``device``), or a
    callable.
    """
    if isinstance(specs, str):
        specs = [specs]  # a bare string would otherwise be split into characters
    return [_resolve_one(spec, device) for spec in specs]


def _run_awaitables(awaitables: list[Awaitable[Any]]) -> list[Any]:
    """Run awaitables concurrently; exceptions are returned in place of results."""

    async def gather() -> list[Any]:
        return await asyncio.gather(*awaitables, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    # Inside a running loop (e.g. a notebook) asyncio.run is forbidden: use a private thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def _accepts(func: Callable[..., Any], keyword: str) -> bool:
    """Whether ``func`` can be called with ``keyword=...`` (a named parameter or ``**kwargs``)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # some builtins and C callables have no signature
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == keyword and p.kind is not p.POSITIONAL_ONLY)
               for p in params)


def _call_all(
    funcs: Sequence[tuple[str, Callable[..., Any]]],
    prompts: list[Any],
    completions: list[str],
    columns: dict[str, list[Any]],
    truncated: list[bool] | None,
) -> list[Any]:
    """Call every function; a raised exception is kept as the function's result."""
    results: list[Any] = []
    pending: dict[int, Awaitable[Any]] = {}
    for i, (_, func) in enumerate(funcs):
        # Only functions that can take it get ``truncated``: older ones keep working unchanged.
        extra = {"truncated": truncated} if truncated is not None and _accepts(func, "truncated") else {}
        try:
            out = func(prompts, completions, **columns, **extra)
        except Exception as exc:  # reported with the function's name by the caller
            out = exc
        if inspect.isawaitable(out):
            pending[i] = out
        results.append(out)
    for i, out in zip(pending, _run_awaitables(list(pending.values())), strict=True):
        results[i] = out
    return results


def _to_scores(name: str, out: Any, n: int) -> list[float]:
    """Validate one function's output; None (and NaN) become NaN."""
    if isinstance(out, BaseException):
        raise RewardFunctionError(
            f"reward function {name!r} raised {type(out).__name__}: {out}"
        ) from out
    if hasattr(out, "tolist"):  # numpy arrays / tensors
        out = out.tolist()
    if not isinstance(out, Sequence) or isinstance(out, str | bytes):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(out).__name__}, expected a list of floats"
        )
    if len(out) != n:
        raise RewardFunctionError(
            f"reward function {name!r} returned {len(out)} scores for {n} completions"
        )
    scores = []
    for i, value in enumerate(out):
        if value is None:
            scores.append(math.nan)
        elif isinstance(value, numbers.Real) and not math.isinf(value):
            scores.append(float(value))
        else:
            raise RewardFunctionError(
                f"reward function {name!r} returned {value!r} for completion {i}; "
                "expected a finite number or None"
            )
    return scores


def score(
    funcs: Sequence[tuple[str, Callable[..., Any]]],
    weights: Sequence[float] | None,
    prompts: list[Any],
    completions: list[str],
    columns: dict[str, list[Any]],
    truncated: Sequence[bool] | None = None,
) -> RewardScores:
    """Score completions with every reward function and combine them.

    Async functions run concurrently. ``columns`` are passed as keyword arguments, and
    ``truncated`` (cut at the length limit, per completion) to the functions that take it.

    Raises:
        RewardFunctionError: a function raised, or returned a wrong count or non-numbers.
        ValueError: weights or columns do not match.
    """
    if not funcs:
        raise ValueError("no reward functions given")
    n = len(completions)
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise ValueError(f"got {len(weights)} reward weights for {len(funcs)} reward functions")
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} completions")
    for key, values in columns.items():
        if key in ("prompts", "completions", "truncated"):
            raise ValueError(f"column name {key!r} clashes with a reward function argument")
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
    if truncated is not None and len(truncated) != n:
        raise ValueError(f"got {len(truncated)} truncated flags for {n} completions")
    cut = None if truncated is None else [bool(t) for t in truncated]
    outputs = _call_all(funcs, prompts, completions, columns, cut)
    names = [name for name, _ in funcs]
    columns_scores = [_to_scores(name, out, n) for name, out in zip(names, outputs, strict=True)]
    per_func = torch.tensor(columns_scores, dtype=torch.float32).reshape(len(funcs), n).T
    total = combine_rewards(per_func, torch.tensor(weights, dtype=torch.float32))  # (N,)
    return RewardScores(per_func=per_func.contiguous(), names=names, total=total)


class RewardModel:
    """A sequence-classification reward model usable as a :class:`RewardFunc`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str = "cpu",
        batch_size: int = 16,
        max_length: int | None = None,
        name: str = "reward_model",
    ) -> None:
        if tokenizer.pad_token is None:
            # Batching needs a pad token; eos is the usual stand-in for decoder-only models.
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = name

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, device: str = "cpu", batch_size: int = 16, **kwargs: Any
    ) -> RewardModel:
        """Load model and tokenizer with ``transformers`` Auto classes."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1)
        return cls(
            model, tokenizer, device, batch_size, name=f"{RM_PREFIX}{name_or_path}", **kwargs
        )

    def _text(self, prompt: Any, completion: str) -> str:
        """Join prompt and completion; conversational prompts go through the chat template."""
        if isinstance(prompt, str):
            return prompt + completion
        messages = [*prompt, {"role": "assistant", "content": completion}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(m["content"] for m in messages)

    def __call__(self, prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
        """Score each prompt + completion; returns ``logits[:, 0]`` as floats."""
        texts = [self._text(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                ).to(self.device)
                logits = self.model(**batch).logits  # (b, num_labels)
                scores.extend(logits[:, 0].float().tolist())
        return scores
