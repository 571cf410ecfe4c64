"""Reward functions: resolution from specs, batched scoring, and reward-model wrapper."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import numbers
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from vroll.plugins import import_callable
from vroll.rl.advantages import combine_rewards
from vroll.rows import completion_text

RM_PREFIX = "rm:"
# What a reward function is called with beside the dataset's columns (TRL's names); no column may be named so.
CALL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "truncated")
# Passed only to the functions that can take them (a named parameter or ``**kwargs``): older ones keep working.
OPTIONAL_ARGUMENTS = ("completion_ids", "trainer_state", "truncated")


class RewardFunc(Protocol):
    """A reward function; may be a plain or an ``async def`` function. It is called by keyword, as TRL calls it.

    ``prompts`` and ``completions`` have one entry per completion: a text prompt's completion is a
    text; a conversational prompt's is a list of messages, ``[{"role": "assistant", "content": ...}]``
    (TRL's form; :func:`completion_text` gives the text of either). ``columns`` are the other dataset
    columns, one list per column aligned with ``completions``. A function that can take them (a named
    parameter or ``**kwargs``) also gets ``completion_ids`` (the sampled token ids), ``trainer_state``
    (a ``transformers.TrainerState``: ``global_step``, ``max_steps``, ``epoch``, as TRL passes) and
    ``truncated`` (per completion, True if it was cut at the length limit without ending: no EOS).
    A function whose parameters TRL's keyword call cannot fill (``def f(p, c, **kw)``) is called
    positionally, ``f(prompts, completions, **columns)``, as vroll called every function before.
    Returns one score per completion; None means "not applicable" to that sample.
    """

    def __call__(
        self, *, prompts: list[Any], completions: list[Any], **columns: Any
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


def _resolve_one(spec: Any, device: str) -> tuple[str, Callable[..., Any]]:
    """Turn one spec into a (name, callable) pair."""
    if isinstance(spec, torch.nn.Module) and hasattr(spec, "config"):  # a loaded reward model, as TRL takes one
        model = RewardModel.from_model(spec, device=device)
        return model.__name__, model
    if callable(spec):
        return getattr(spec, "__name__", None) or type(spec).__name__, spec
    if not isinstance(spec, str):
        raise TypeError(f"a reward function is a callable, a name or a model id, got {type(spec).__name__}")
    if spec.startswith(RM_PREFIX):
        return spec, RewardModel.from_pretrained(spec[len(RM_PREFIX) :], device=device)
    if ":" in spec:
        return spec, import_callable(spec)
    builtins = builtin_reward_funcs()
    if spec in builtins:
        return spec, builtins[spec]
    if "/" in spec or Path(spec).is_dir():  # a model id or a folder, as TRL takes one: a reward model
        try:
            return f"{RM_PREFIX}{spec}", RewardModel.from_pretrained(spec, device=device)
        except (OSError, ValueError) as exc:
            raise ValueError(f"reward function {spec!r} is no built-in ({', '.join(sorted(builtins))}), and loading "
                             f"it as a reward model failed: {exc}") from None
    raise ValueError(
        f"unknown reward function {spec!r}; built-ins: {', '.join(sorted(builtins))}; or use "
        "'package.module:function', a reward model ('org/name', a folder or 'rm:<name>'), or pass a callable"
    )


def resolve_reward_funcs(specs: Any, *, device: str = "cpu") -> list[tuple[str, Callable[..., Any]]]:
    """Resolve reward specs to ``(name, callable)`` pairs; ``specs`` is one spec or a list of them (as TRL takes).

    A spec is a built-in name (see :func:`builtin_reward_funcs`), ``"package.module:function"``,
    a sequence-classification reward model loaded on ``device`` (``"rm:<name_or_path>"``, a model
    id ``"org/name"``, a folder, or a loaded model), or a callable.
    """
    if isinstance(specs, str) or callable(specs):
        specs = [specs]  # one spec (a bare string would otherwise be split into characters)
    if not isinstance(specs, Sequence):
        raise TypeError(f"reward_funcs takes a reward function or a list of them, got {type(specs).__name__}")
    return [_resolve_one(spec, device) for spec in specs]


def reward_completions(prompts: Sequence[Any], texts: Sequence[str],
                       conversations: Sequence[list[dict[str, Any]]] | None = None) -> list[Any]:
    """The ``completions`` reward functions get, in TRL's form: a text prompt's completion is its text; a
    conversational prompt's is a list of messages, ``[{"role": "assistant", "content": text}]``, or a
    multi-turn episode's every message after its prompt (``conversations``)."""
    out: list[Any] = []
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        if isinstance(prompt, str):
            out.append(text)
        else:
            out.append(list(conversations[i]) if conversations else [{"role": "assistant", "content": text}])
    return out


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


def _binds(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def _keywords(func: Callable[..., Any], names: Collection[str]) -> list[str]:
    """The names ``func`` is passed beside prompts and completions: every column, and each optional
    argument (``OPTIONAL_ARGUMENTS``) that it can take."""
    return [n for n in names if n not in OPTIONAL_ARGUMENTS or _accepts(func, n)]


def takes_positionally(func: Callable[..., Any], names: Collection[str]) -> bool:
    """Whether ``func`` is called ``func(prompts, completions, **rest)``, as vroll called every function before:
    TRL's keyword call cannot bind its parameters (``def f(p, c, **kw)``) and the positional one can.

    ``names``: the columns and optional arguments of the call. A function that neither call binds, or whose
    signature cannot be read, is called by keyword (TRL's way): its own error then says what it misses.
    """
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return False
    rest = dict.fromkeys(_keywords(func, names))
    return (not _binds(signature, (), {"prompts": None, "completions": None, **rest})
            and _binds(signature, (None, None), rest))


def positional_reward_funcs(funcs: Sequence[tuple[str, Callable[..., Any]]], columns: Collection[str]) -> list[str]:
    """The names of the functions that :func:`score` calls positionally (see :func:`takes_positionally`)."""
    names = [*columns, *OPTIONAL_ARGUMENTS]
    return [name for name, func in funcs if takes_positionally(func, names)]


def _call_all(
    funcs: Sequence[tuple[str, Callable[..., Any]]],
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list[Any]],
    optional: dict[str, Any],
) -> list[Any]:
    """Call every function (by keyword, or positionally: :func:`takes_positionally`); a raised exception is
    kept as the function's result."""
    results: list[Any] = []
    pending: dict[int, Awaitable[Any]] = {}
    values = {**columns, **optional}
    for i, (_, func) in enumerate(funcs):
        kwargs = {k: values[k] for k in _keywords(func, values)}
        try:
            if takes_positionally(func, values):
                out = func(prompts, completions, **kwargs)
            else:
                out = func(prompts=prompts, completions=completions, **kwargs)
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
    completions: list[Any],
    columns: dict[str, list[Any]],
    truncated: Sequence[bool] | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
    trainer_state: Any = None,
) -> RewardScores:
    """Score completions with every reward function and combine them.

    Async functions run concurrently. Each function gets ``prompts=``, ``completions=`` and the
    ``columns`` by keyword (see :class:`RewardFunc`), and ``truncated`` (cut at the length limit, per
    completion), ``completion_ids`` and ``trainer_state`` when it can take them.

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
        if key in CALL_ARGUMENTS:
            raise ValueError(f"column name {key!r} clashes with a reward function argument")
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
    if truncated is not None and len(truncated) != n:
        raise ValueError(f"got {len(truncated)} truncated flags for {n} completions")
    if completion_ids is not None and len(completion_ids) != n:
        raise ValueError(f"got {len(completion_ids)} completion_ids for {n} completions")
    optional = {"truncated": None if truncated is None else [bool(t) for t in truncated],
                "completion_ids": None if completion_ids is None else [list(c) for c in completion_ids],
                "trainer_state": trainer_state}
    outputs = _call_all(funcs, prompts, completions, columns, {k: v for k, v in optional.items() if v is not None})
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
    def from_model(cls, model: Any, device: str = "cpu", **kwargs: Any) -> RewardModel:
        """A loaded sequence-classification model, with the tokenizer of its ``name_or_path`` (as TRL loads it)."""
        from transformers import AutoTokenizer

        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        return cls(model, AutoTokenizer.from_pretrained(name), device, name=f"{RM_PREFIX}{name}", **kwargs)

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

    def _text(self, prompt: Any, completion: str | list[dict[str, Any]]) -> str:
        """Join prompt and completion (either form); conversational prompts go through the chat template."""
        if isinstance(prompt, str):
            return prompt + completion_text(completion)
        reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
        messages = [*prompt, *reply]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n".join(m["content"] for m in messages)

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
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
