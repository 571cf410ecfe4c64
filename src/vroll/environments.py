"""Environments: multi-turn episodes, with the reward at their end.

An environment is a small stateful object that talks with the model in chat messages:
``reset(row)`` gives an episode's first messages (usually the row's prompt), then each
``step(reply)`` takes the model's reply, as text, and says what the environment answers
(tool results, observations), whether the episode is over, and its reward at the end.

    class Guess:                                    # --environment mymodule:Guess
        def __init__(self, row): self.secret = int(row["answer"])
        def reset(self, row): return row["prompt"]
        def step(self, reply):
            if reply.strip() == str(self.secret):
                return StepResult([], done=True, reward=1.0)
            return StepResult([{"role": "user", "content": "No. Try again."}], done=False)

``--environment package.module:factory`` names a callable that takes the dataset row and
returns an environment: one instance per episode (``n`` per prompt), so the episodes of a
group never share state; a multi-turn task's name (``calculator``) names its own
(``vroll.tasks.load_environment``). The trainer runs the episodes (``vroll.generation.episodes``); the
generation server only ever sees token ids. The environment's reward is scored by the
built-in ``environment`` reward function (the default one with ``--environment``); add
other ``--reward_funcs`` to score the model's last reply as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from vroll.protocol import ChatMessage

Message = ChatMessage | dict[str, Any]  # a dict is checked into a ChatMessage ({"role": ..., "content": ...})


@dataclass(frozen=True)
class StepResult:
    """What an environment says after one reply of the model."""

    messages: Sequence[Message] = ()  # what it says next (tool results, observations); read unless done
    done: bool = False
    reward: float | None = None  # at the end of the episode; None: only the other reward functions score it


class Environment(Protocol):
    """One episode's environment (see the module docstring)."""

    def reset(self, row: dict[str, Any]) -> Sequence[Message]: ...

    def step(self, reply: str) -> StepResult: ...


EnvironmentFactory = Callable[[dict[str, Any]], Environment]


@dataclass(frozen=True)
class EpisodeInfo:
    """One episode beside its tokens (those are the ``Rollout``'s): its conversation, reward and error."""

    # the first messages, then each reply (role "assistant") and answer; a truncated episode's last answer
    # may be here without being in its tokens (it did not fit, or max_turns left no reply to follow it)
    messages: tuple[ChatMessage, ...]
    turns: int  # replies of the model
    reward: float | None  # the environment's at the end; 0.0 after an error; None: it gave none
    error: str | None = None  # the exception that ended the episode (an environment's bug, not the run's)
    token_counts: tuple[int, int] = field(default=(0, 0))  # (model tokens, environment tokens) of the completion

    def sample(self) -> dict[str, Any]:
        """For ``samples.jsonl``: the conversation as a person reads it."""
        out: dict[str, Any] = {"conversation": [{"role": m.role, "content": m.text()} for m in self.messages],
                               "turns": self.turns, "env_reward": self.reward,
                               "model_tokens": self.token_counts[0], "env_tokens": self.token_counts[1]}
        return out | ({"env_error": self.error} if self.error else {})


def as_messages(value: Any, where: str) -> list[ChatMessage]:
    """An environment's messages as ``ChatMessage``s, or a ValueError saying which one is wrong."""
    if isinstance(value, str | bytes | dict) or not isinstance(value, Sequence):
        raise ValueError(f"{where} must return a list of chat messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        try:
            out.append(m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m))
        except ValidationError as exc:
            raise ValueError(f"{where}: message {i} is not a chat message ({{'role': ..., 'content': ...}}): "
                             f"{exc.errors()[0]['msg']}") from None
    return out


def as_step_result(value: Any) -> StepResult:
    """A ``step`` result, checked (a wrong type is the environment's bug: it ends the episode)."""
    if not isinstance(value, StepResult):
        raise TypeError(f"step() must return a StepResult, got {type(value).__name__}")
    if value.reward is not None and not isinstance(value.reward, int | float):
        raise TypeError(f"StepResult.reward must be a number or None, got {type(value.reward).__name__}")
    return value


def environment_reward(prompts: list[Any], completions: list[Any], env_reward: list[float | None] | None = None,
                       **columns: Any) -> list[float | None]:
    """The reward function ``environment``: each episode's reward from its environment (None: it gave none)."""
    if env_reward is None:
        raise ValueError("the 'environment' reward function scores episodes of --environment; this run has none")
    return list(env_reward)
