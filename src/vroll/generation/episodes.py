"""Multi-turn episodes: the trainer's driver between a generator and ``--environment``.

Each turn is one ``Generator.generate`` call with every live episode's tokens so far as its
prompt and ``n=1`` (a server sees plain token-in / token-out requests; its prefix cache makes
the re-sent prefix cheap). An episode is ONE token sequence: its first prompt, then each
reply exactly as the engine sampled it (mask 1, with its sampling logprobs) and each answer
of the environment (mask 0), up to ``max_turns`` replies and ``max_completion_length``
tokens in all. It becomes one row of a :class:`~vroll.generation.rollout.Rollout`. The runner drives any
:class:`~vroll.generation.generator.Generator`.

Tokenization is append-only: the model's ids are never re-tokenized (text -> ids can give
other ids than the ones sampled, and the logprobs would no longer belong to the trained
tokens). The environment's messages are rendered with the chat template after a fixed
probe conversation, and only the rendered delta is tokenized and appended, after what the
template writes to close a reply that the model did not sample itself (ChatML's newline
after ``<|im_end|>``).

An environment that raises ends its own episode (reward 0, ``env/errors``, the message in
``samples.jsonl``), never the run.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vroll.batching import turn_seed
from vroll.environments import Environment, EnvironmentFactory, EpisodeInfo, as_messages, as_step_result
from vroll.generation.prompts import encode_prompts
from vroll.generation.rollout import Rollout
from vroll.protocol import ChatMessage, PromptInput, SamplingSpec

if TYPE_CHECKING:
    import torch

    from vroll.generation.generator import Generator

log = logging.getLogger(__name__)

_SENTINEL = "\u2063vroll-reply\u2063"  # an assistant reply no template rewrites, to find where replies end


class TurnRenderer:
    """The token ids an environment's messages add after a reply (append-only tokenization)."""

    def __init__(self, tokenizer: Any, tools: list[dict] | None = None) -> None:
        self.tokenizer = tokenizer
        self.tools = tools  # rendered the same way before and after: they cancel out of the delta
        self.probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
        self.before = tokenizer.apply_chat_template(self.probe, tokenize=False, tools=tools)
        if _SENTINEL not in self.before:
            raise ValueError("the chat template drops assistant replies from the conversation: multi-turn "
                             "episodes cannot be rendered append-only with it")
        self.closing = self.before.rsplit(_SENTINEL, 1)[1]  # after a reply: "<|im_end|>\n" in ChatML
        self.special = set(tokenizer.all_special_ids)

    def after_reply(self, reply_ids: list[int], messages: list[ChatMessage]) -> list[int]:
        """Ids that follow ``reply_ids``: the rest of the reply's closing, ``messages`` and the next reply's header."""
        after = self.tokenizer.apply_chat_template(self.probe + [m.for_template() for m in messages],
                                                   tokenize=False, add_generation_prompt=True, tools=self.tools)
        if not after.startswith(self.before):
            raise ValueError("the chat template renders the earlier turns differently once these messages follow "
                             "(append-only tokenization needs a template that only appends)")
        closing = self.closing
        if reply_ids and reply_ids[-1] in self.special:  # the reply ended with the template's own end token
            last = self.tokenizer.decode(reply_ids[-1:])
            closing = closing[len(last):] if closing.startswith(last) else closing
        return self.tokenizer(closing + after[len(self.before):], add_special_tokens=False).input_ids


@dataclass
class _Running:
    """One episode while it runs; :meth:`EpisodeRunner._rollout` turns it into a Rollout row."""

    env: Environment
    prompt_ids: list[int]
    messages: list[ChatMessage]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    version: int | None = None  # the oldest weights any reply was sampled with
    reply: str = ""  # the model's last reply (what reward functions score)
    turns: int = 0
    done: bool = False
    truncated: bool = False  # max_completion_length or max_turns reached before the environment ended it
    reward: float | None = None
    error: str | None = None


class EpisodeRunner:
    """Runs the episodes of a generation batch against a generator (see the module docstring)."""

    def __init__(self, factory: EnvironmentFactory, tokenizer: Any, max_turns: int, max_prompt_length: int | None,
                 max_completion_length: int, tools: list[dict] | None = None) -> None:
        self.factory = factory
        # its own copy: with async generation the episodes run in the producer thread while the main thread
        # encodes the next prompts, and a fast tokenizer shared between threads can raise "Already borrowed"
        self.tokenizer = copy.deepcopy(tokenizer)
        tokenizer = self.tokenizer
        self.tools = tools  # --tools: their JSON schemas, for the chat template
        self.renderer = TurnRenderer(tokenizer, tools)
        self.tools_prompt = tools_prompt(tokenizer, tools)
        self.max_turns = max_turns
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length

    def run(self, generator: Generator, rows: list[dict[str, Any]], sampling: SamplingSpec,
            first_index: int = 0) -> Rollout:
        """``sampling.n`` episodes per row, prompt-major, as one Rollout (``first_index``: the index of ``rows[0]``)."""
        start = time.perf_counter()
        episodes = [self._start(row) for row in rows for _ in range(sampling.n)]
        with_logps = True
        for turn in range(self.max_turns):
            live = [e for e in episodes if not e.done]
            if not live:
                break
            prompts = [PromptInput(e.prompt_ids + e.ids) for e in live]  # all live episodes in one call
            out = generator.generate(prompts, self._sampling(sampling, turn, live), first_index * sampling.n)
            with_logps = with_logps and out.sampling_logps is not None
            for i, episode in enumerate(live):
                self._take_reply(episode, out, i)
                if not episode.done:
                    self._step(episode, last_turn=turn + 1 == self.max_turns)
        return self._rollout(episodes, with_logps, time.perf_counter() - start)

    def _start(self, row: dict[str, Any]) -> _Running:
        env = self.factory(row)
        messages = as_messages(env.reset(row), f"{type(env).__name__}.reset")
        if self.tools_prompt:  # a template that ignores tools= gets them in a system message
            messages = [ChatMessage(role="system", content=self.tools_prompt), *messages]
        if any(m.images() for m in messages):
            raise ValueError(f"{type(env).__name__}.reset: images in an environment's messages are not supported yet")
        prompt = encode_prompts(self.tokenizer, [[m.for_template() for m in messages]], self.max_prompt_length,
                                tools=self.tools)[0]
        return _Running(env, prompt.token_ids, messages)

    def _sampling(self, sampling: SamplingSpec, turn: int, live: list[_Running]) -> SamplingSpec:
        """One reply per episode, as long as the longest budget left (each reply is then cut to its own)."""
        room = max(self.max_completion_length - len(e.ids) for e in live)
        return sampling.model_copy(update={"n": 1, "max_tokens": room, "seed": turn_seed(sampling.seed, turn)})

    def _take_reply(self, e: _Running, out: Rollout, i: int) -> None:
        sent = e.prompt_ids + e.ids
        if out.prompt_ids[i] != sent:  # the one promise append-only tokenization rests on
            raise RuntimeError(f"the generator ran other prompt ids than it was sent ({len(out.prompt_ids[i])} "
                               f"tokens for {len(sent)})")
        room = self.max_completion_length - len(e.ids)
        ids = out.completion_ids[i][:room]
        e.ids += ids
        e.mask += [1] * len(ids)
        e.logps += out.sampling_logps[i][:room] if out.sampling_logps is not None else [0.0] * len(ids)
        e.version = out.weight_versions[i] if e.version is None else min(e.version, out.weight_versions[i])
        cut = len(out.completion_ids[i]) > room
        e.reply = self.tokenizer.decode(ids, skip_special_tokens=True) if cut else out.texts[i]
        e.messages.append(ChatMessage(role="assistant", content=e.reply))
        e.turns += 1
        if cut or out.truncated[i]:
            e.done = e.truncated = True

    def _step(self, e: _Running, last_turn: bool) -> None:
        """The environment's answer to the reply just taken: the episode ends, or its answer is appended."""
        try:
            result = as_step_result(e.env.step(e.reply))
            messages = as_messages(result.messages, f"{type(e.env).__name__}.step")
            e.messages += messages
            if result.done or last_turn:  # no reply would follow: nothing more to append
                e.done, e.truncated, e.reward = True, not result.done, result.reward
                return
            ids = self.renderer.after_reply(e.ids, messages)
        except Exception as exc:  # noqa: BLE001 - the environment's bug ends its episode, not the run
            e.done, e.reward, e.error = True, 0.0, f"{type(exc).__name__}: {exc}"
            log.warning("environment %s raised in step (episode ended, reward 0): %s", type(e.env).__name__, e.error)
            return
        if len(e.ids) + len(ids) >= self.max_completion_length:  # no room left for a reply
            e.done = e.truncated = True
            return
        e.ids += ids
        e.mask += [0] * len(ids)
        e.logps += [0.0] * len(ids)

    def _rollout(self, episodes: list[_Running], with_logps: bool, seconds: float) -> Rollout:
        infos = [EpisodeInfo(tuple(e.messages), e.turns, e.reward, e.error, (sum(e.mask), len(e.mask) - sum(e.mask)))
                 for e in episodes]
        return Rollout([e.prompt_ids for e in episodes], [e.ids for e in episodes], [e.mask for e in episodes],
                       [e.reply for e in episodes], [e.logps for e in episodes] if with_logps else None,
                       [e.truncated for e in episodes], [e.version or 0 for e in episodes], seconds,
                       [PromptInput(e.prompt_ids) for e in episodes], infos)


def tools_prompt(tokenizer: Any, tools: list[dict] | None) -> str | None:
    """The system prompt that lists ``tools`` where the chat template does not render them itself, else None."""
    from vroll.tools import tools_system_prompt

    probe = [{"role": "user", "content": "?"}]
    if not tools or tokenizer.apply_chat_template(probe, tokenize=False, tools=tools) != \
            tokenizer.apply_chat_template(probe, tokenize=False):
        return None
    return tools_system_prompt(tools)


def episode_runner(tokenizer: Any, *, environment: str | None = None, tools: list[str] | None = None,
                   tool_timeout: float = 10.0, max_turns: int, max_prompt_length: int | None,
                   max_completion_length: int) -> EpisodeRunner | None:
    """The runner of ``--environment`` (a task's name or ``package.module:factory``) or ``--tools`` (None
    without either)."""
    if tools:
        from vroll.tools import load_tools, tool_environment, tool_schemas

        funcs = load_tools(tools)
        return EpisodeRunner(tool_environment(funcs, tool_timeout), tokenizer, max_turns, max_prompt_length,
                             max_completion_length, tool_schemas(funcs))
    if environment is None:
        return None
    from vroll.tasks import load_environment

    return EpisodeRunner(load_environment(environment), tokenizer, max_turns, max_prompt_length, max_completion_length)


def episode_columns(rollout: Rollout) -> dict[str, list[Any]]:
    """Reward-function columns of a rollout's episodes: ``env_reward`` (for the ``environment`` reward)."""
    return {"env_reward": [e.reward for e in rollout.episodes]} if rollout.episodes else {}


def episode_completions(rollout: Rollout) -> list[list[dict[str, Any]]] | None:
    """Each episode's messages from its first reply on: a conversational completion as reward functions get
    it (TRL's form, tool turns included); None without episodes."""
    if not rollout.episodes:
        return None
    out = []
    for e in rollout.episodes:
        first = next((i for i, m in enumerate(e.messages) if m.role == "assistant"), len(e.messages))
        out.append([{"role": m.role, "content": m.text()} for m in e.messages[first:]])
    return out


def zero_failed(total: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """Rewards with every episode that an environment error ended set to 0."""
    for i, e in enumerate(rollout.episodes):
        if e.error is not None:
            total[i] = 0.0
    return total


def episode_metrics(rollout: Rollout) -> dict[str, float]:
    """``env/*`` metrics of a generation batch (none without episodes)."""
    if not rollout.episodes:
        return {}
    n = len(rollout.episodes)
    model, env = (sum(e.token_counts[k] for e in rollout.episodes) for k in (0, 1))
    return {"env/errors": float(sum(e.error is not None for e in rollout.episodes)),
            "env/turns_mean": sum(e.turns for e in rollout.episodes) / n,
            "env/model_token_frac": model / max(1, model + env)}
