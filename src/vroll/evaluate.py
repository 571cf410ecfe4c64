"""``vroll eval``: strict accuracy of a model on a built-in task's held-out split.

    vroll eval --model runs/demo/final --task addition --split test --n 200 --output_json eval.json

Greedy accuracy (and pass@k over k sampled replies, with ``--pass_k``) scored by the task's
strict judge: the whole reply must be the answer and must end (EOS) within ``--max_tokens``.
A task with an environment (``calculator``) is judged on whole greedy episodes, run by the
trainer's own episode driver: the final reply must be right, the environment must agree, and
the episode must end within ``--max_tokens`` tokens of replies and answers.
Replies come from one of three backends, all fed the same chat-templated token ids:

- ``--server URL``: a running ``vroll serve`` (whatever weights it serves now);
- ``--colocate``: a vLLM engine in this process (``vroll.engine.vllm_adapter.VLLMEngine``);
- ``--backend transformers`` (the default): ``generate()`` with transformers, no vLLM.

:class:`EvalCallback` runs the same evaluation on a trainer's live policy every ``eval_steps``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vroll.engine.config import EngineConfig
from vroll.flags import Nested, check, parse_config
from vroll.flags import field as flag
from vroll.protocol import Completion, GenerateJob, PromptInput, PromptResult, SamplingSpec
from vroll.rows import images_of, prompt_of
from vroll.tasks import SPLITS, get_task

BACKENDS = ("transformers", "colocate", "server")
EVAL_ENGINE = EngineConfig(enforce_eager=True, max_model_len=1024)  # the colocated engine's defaults here

# (prompts, sampling) -> one result per prompt, with sampling.n completions each: the engine's types,
# whichever backend produced them ("length" finish: cut at max_tokens without EOS)
Generate = Callable[[list[PromptInput], SamplingSpec], list[PromptResult]]


@dataclass(frozen=True)
class EvalSample:
    """One problem's greedy reply, whole, and its strict score."""

    question: str
    answer: str
    reply: str
    truncated: bool
    correct: bool


@dataclass
class EvalResult:
    """What ``vroll eval`` measures and writes to ``--output_json``."""

    model: str
    task: str
    split: str
    n: int
    backend: str
    max_tokens: int
    accuracy: float  # greedy, strict
    truncated_frac: float  # of the greedy replies
    pass_k: int | None = None
    pass_at_k: float | None = None  # fraction of problems with a right reply among pass_k samples
    temperature: float | None = None  # of the pass@k samples
    seconds: float = 0.0
    samples: list[EvalSample] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        line = (f"{self.task}/{self.split} n={self.n} [{self.backend}] greedy accuracy {self.accuracy:.1%} "
                f"(strict; {self.truncated_frac:.0%} truncated at {self.max_tokens} tokens)")
        if self.pass_k:
            line += f", pass@{self.pass_k} {self.pass_at_k:.1%} at temperature {self.temperature}"
        return line


def encode_chat(tokenizer: Any, rows: list[dict[str, Any]]) -> list[PromptInput]:
    """Each row's prompt through the chat template, with its images, as the trainer encodes it."""
    from vroll.generation.prompts import encode_prompts

    return encode_prompts(tokenizer, [prompt_of(r) for r in rows], None, [images_of(r) for r in rows])


def _truncated(c: Completion) -> bool:
    return c.finish_reason == "length"


def _question(prompt: Any) -> str:
    """The text of the prompt's last turn (its image parts left out)."""
    if isinstance(prompt, str):
        return prompt
    content = prompt[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def run_eval(generate: Generate, tokenizer: Any, *, model: str, backend: str, task: str = "addition",
             split: str = "test", n: int = 200, max_tokens: int | None = None, pass_k: int | None = None,
             temperature: float = 1.0, seed: int = 0) -> EvalResult:
    """Evaluate with a ready ``generate`` function (any backend, or a trainer's live policy).

    ``max_tokens``: the reply limit (default: the task's); for a task with an environment, the
    limit of a whole episode, whose replies and environment answers all count.
    """
    spec = get_task(task)
    max_tokens = spec.max_tokens if max_tokens is None else max_tokens
    if pass_k is not None and pass_k < 1:
        raise ValueError(f"pass_k must be >= 1, got {pass_k}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    rows = spec.rows(split, n)
    replies = _episode_replies(spec, generate, tokenizer, max_tokens) if spec.environment else \
        _single_replies(generate, encode_chat(tokenizer, rows))
    start = time.perf_counter()
    greedy = replies(rows, SamplingSpec(temperature=0.0, max_tokens=max_tokens, seed=seed))
    correct = [ok for ok, _ in (_judge(task, [row], [g]) for row, g in zip(rows, greedy, strict=True))]
    result = EvalResult(model=model, task=task, split=split, n=n, backend=backend, max_tokens=max_tokens,
                        accuracy=sum(correct) / n, truncated_frac=sum(g.truncated for g in greedy) / n)
    result.samples = [EvalSample(_question(r["prompt"]), str(r[spec.answer_column]), g.shown, g.truncated, ok)
                      for r, g, ok in zip(rows, greedy, correct, strict=True)]
    if pass_k:
        sampled = replies([row for row in rows for _ in range(pass_k)],
                          SamplingSpec(temperature=temperature, max_tokens=max_tokens, seed=seed))
        hits = [_judge(task, [row] * pass_k, sampled[i * pass_k:(i + 1) * pass_k])[1] for i, row in enumerate(rows)]
        result.pass_k, result.pass_at_k, result.temperature = pass_k, sum(hits) / n, temperature
    result.seconds = time.perf_counter() - start
    return result


@dataclass(frozen=True)
class _Reply:
    """What the judge reads of one attempt: the final reply, whether it was cut, and what a person is shown."""

    text: str
    truncated: bool
    shown: str  # the reply; for an episode, every turn after the prompt
    reward: float | None = None  # the environment's own verdict, for an episode


def _judge(task: str, rows: list[dict[str, Any]], replies: list[_Reply]) -> tuple[bool, bool]:
    """(the first attempt right, any attempt right): the task's strict judge, and the environment's where it has one."""
    spec = get_task(task)
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    scores = spec.correct([r["prompt"] for r in rows], [x.text for x in replies],
                          truncated=[x.truncated for x in replies], **columns)
    right = [s == 1.0 and (x.reward is None or x.reward == 1.0) for s, x in zip(scores, replies, strict=True)]
    return right[0], any(right)


def _single_replies(generate: Generate, prompts: list[PromptInput]) -> Callable[..., list[_Reply]]:
    """One reply per row (``rows`` repeated for pass@k: the engine's n samples them together)."""

    def replies(rows: list[dict[str, Any]], sampling: SamplingSpec) -> list[_Reply]:
        k = len(rows) // len(prompts)
        out = generate(prompts, sampling.model_copy(update={"n": k}))
        return [_Reply(c.text, _truncated(c), c.text) for r in out for c in r.completions]

    return replies


def _episode_replies(spec: Any, generate: Generate, tokenizer: Any, max_tokens: int) -> Callable[..., list[_Reply]]:
    """Whole episodes in the task's environment, every live one in one call per turn (the trainer's driver)."""
    from vroll.generation.episodes import EpisodeRunner

    runner = EpisodeRunner(spec.environment, tokenizer, max_turns=EVAL_MAX_TURNS,
                           max_prompt_length=None, max_completion_length=max_tokens)
    source = _RolloutGenerator(generate)

    def replies(rows: list[dict[str, Any]], sampling: SamplingSpec) -> list[_Reply]:
        out = runner.run(source, rows, sampling)
        return [_Reply(text, cut, _transcript(e), e.reward)
                for text, cut, e in zip(out.texts, out.truncated, out.episodes, strict=True)]

    return replies


EVAL_MAX_TURNS = 4  # enough for any built-in environment task; an episode that needs more has failed


def _transcript(episode: Any) -> str:
    """An episode's turns after its prompt, one per line, as a person reads them."""
    messages = list(episode.messages)
    first = next((i for i, m in enumerate(messages) if m.role == "assistant"), len(messages))
    return "\n".join(f"[{m.role}] {m.text()}" for m in messages[first:])


class _RolloutGenerator:
    """A ``Generate`` as a ``vroll.generation.generator.Generator`` (weights never move), for the episode driver."""

    local = True

    def __init__(self, generate: Generate) -> None:
        self._generate = generate

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Any:
        from vroll.generation.rollout import Rollout
        from vroll.protocol import GenerateResult

        start = time.perf_counter()
        results = self._generate(prompts, sampling)
        return Rollout.from_results(GenerateResult(results, 0), time.perf_counter() - start, prompts,
                                    with_logprobs=False)

    def push_weights(self, model: Any) -> None:
        pass  # evaluated as loaded

    def end_sync(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- backends


def server_generate(client: Any) -> Generate:
    """Replies from a running ``vroll serve`` through a :class:`vroll.client.GenerationClient`."""

    def generate(prompts: list[PromptInput], sampling: SamplingSpec) -> list[PromptResult]:
        sent = prompts if any(p.images for p in prompts) else [p.token_ids for p in prompts]
        return client.generate(sent, sampling).results

    return generate


def engine_generate(engine: Any) -> Generate:
    """Replies from an in-process :class:`vroll.engine.vllm_adapter.VLLMEngine`."""

    def generate(prompts: list[PromptInput], sampling: SamplingSpec) -> list[PromptResult]:
        return engine.generate(GenerateJob(prompts, sampling, first_index=0))

    return generate


def transformers_generate(model: Any, tokenizer: Any, batch_size: int = 64) -> Generate:
    """``model.generate()`` through the trainer's :class:`~vroll.generation.plain.TransformersGenerator`."""
    from vroll.generation.plain import TransformersGenerator
    from vroll.vision import ImageCodec

    return TransformersGenerator(model, tokenizer, batch_size=batch_size, images=ImageCodec.for_model(model)).results


@contextmanager
def open_backend(backend: str, model_path: str, server_url: str | None = None,
                 engine: EngineConfig = EVAL_ENGINE) -> Iterator[Generate]:
    """A ``Generate`` for ``backend``, closed (engine freed, connection shut) on exit. ``engine``: the colocated
    engine's options (``vroll eval --colocate --max-model-len ...``, the flags of ``vroll serve``)."""
    if backend == "server":
        from vroll.client import GenerationClient

        if not server_url:
            raise ValueError("the server backend needs --server URL")
        with GenerationClient(server_url) as client:
            client.wait_until_ready(timeout=60)
            yield server_generate(client)
    elif backend == "colocate":
        from vroll.engine.config import EngineSpec
        from vroll.engine.vllm_adapter import VLLMEngine

        vllm = VLLMEngine(EngineSpec(model=model_path, served_name=model_path, config=engine))
        try:
            yield engine_generate(vllm)
        finally:
            del vllm
    elif backend == "transformers":
        from vroll.trainer.model.vision import policy_class

        model = policy_class(model_path).from_pretrained(model_path, dtype=torch.float32).eval()
        yield transformers_generate(model, _tokenizer(model_path))
    else:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def _tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def evaluate(model: str | None = None, *, task: str = "addition", split: str = "test", n: int = 200,
             pass_k: int | None = None, backend: str = "transformers", server_url: str | None = None,
             max_tokens: int | None = None, temperature: float = 1.0, seed: int = 0,
             engine: EngineConfig = EVAL_ENGINE) -> EvalResult:
    """Strict accuracy of ``model`` (a folder, a Hub id, or None: the embedded model) on ``task``.

    With ``backend="server"`` the replies come from the server at ``server_url`` (its current
    weights); ``model`` then only names the tokenizer that renders the prompts.
    """
    from vroll.models import resolve_model

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    get_task(task)  # an unknown task fails before a model loads
    path = resolve_model(model)
    with open_backend(backend, path, server_url, engine) as generate:
        return run_eval(generate, _tokenizer(path), model=model or path, backend=backend, task=task,
                        split=split, n=n, max_tokens=max_tokens, pass_k=pass_k, temperature=temperature,
                        seed=seed)


# ---------------------------------------------------------------------------- trainer callback


class EvalCallback:
    """``trainer.add_callback(EvalCallback(eval_steps=10))``: every ``eval_steps`` optimizer steps,
    greedy strict accuracy of the trainer's live policy (transformers, in this process) goes
    into the step's metrics as ``eval/accuracy`` (and ``eval/truncated_frac``). Every process
    evaluates (greedy, so all agree), so no process waits on another."""

    def __init__(self, eval_steps: int, task: str = "addition", split: str = "test", n: int = 200,
                 max_tokens: int | None = None) -> None:
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}")
        get_task(task)
        self.eval_steps, self.task, self.split, self.n, self.max_tokens = eval_steps, task, split, n, max_tokens
        self.last: EvalResult | None = None

    def __call__(self, trainer: Any, metrics: dict[str, float]) -> None:
        if trainer.state.global_step % self.eval_steps:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        try:
            self.last = run_eval(transformers_generate(model, trainer.tokenizer), trainer.tokenizer,
                                 model="policy", backend="transformers", task=self.task, split=self.split,
                                 n=self.n, max_tokens=self.max_tokens)
        finally:
            model.train(was_training)
        metrics["eval/accuracy"] = self.last.accuracy
        metrics["eval/truncated_frac"] = self.last.truncated_frac


def eval_callbacks(args: Any) -> list[EvalCallback]:
    """What a trainer config's ``--eval_steps`` asks for (the trainer CLIs pass them to the trainer; in Python,
    ``GRPOTrainer(..., callbacks=eval_callbacks(args))``)."""
    if not args.eval_steps:
        return []
    return [EvalCallback(args.eval_steps, task=args.eval_task, n=args.eval_n, max_tokens=args.max_completion_length)]


# ---------------------------------------------------------------------------- CLI


@dataclass
class EvalConfig:
    """The flags of ``vroll eval`` (``--config file.yaml`` takes the same fields)."""

    model: str | None = flag(None, help="model folder or Hub id (default: the embedded model)")
    task: str = flag("addition", help="built-in task (addition, rec, calculator)")
    split: Literal["train", "test"] = flag("test", help="the task's split")
    n: int = flag(200, help="problems (the split's first n)")
    pass_k: int | None = flag(None, help="also pass@k over k sampled replies")
    temperature: float = flag(1.0, help="of the pass@k samples")
    max_tokens: int | None = flag(None, help="reply length limit (a whole episode's for calculator); default: "
                                             "the task's, 24 or 96")
    seed: int = flag(0, help="sampling seed")
    server: str | None = flag(None, help="a running vroll serve (URL)")
    colocate: bool = flag(False, help="a vLLM engine in this process")
    backend: Literal["transformers", "colocate", "server"] | None = flag(None, help="default: transformers")
    output_json: str | None = flag(None, help="write the result here")
    # the colocated engine: the flags of vroll serve (--max-model-len, --kv-cache-memory-gib (CPU: e.g. 1), ...)
    engine = Nested(EngineConfig, "", dash=True, exclude=("enable_sleep_mode",),
                    defaults={"max_model_len": EVAL_ENGINE.max_model_len, "enforce_eager": EVAL_ENGINE.enforce_eager})

    def __post_init__(self) -> None:
        given = [name for name, on in (("--server", self.server), ("--colocate", self.colocate),
                                       ("--backend", self.backend)) if on]
        check(len(given) <= 1, f"give one of --server, --colocate and --backend, not {' and '.join(given)}")
        self.engine  # noqa: B018 - validates the engine flags

    def backend_name(self) -> str:
        return "server" if self.server else "colocate" if self.colocate else self.backend or "transformers"


def run_config(cfg: EvalConfig) -> int:
    """Evaluate as ``cfg`` says, print the summary and a few replies, write ``--output_json``."""
    try:
        result = evaluate(cfg.model, task=cfg.task, split=cfg.split, n=cfg.n, pass_k=cfg.pass_k,
                          backend=cfg.backend_name(), server_url=cfg.server, max_tokens=cfg.max_tokens,
                          temperature=cfg.temperature, seed=cfg.seed, engine=cfg.engine)
    except ValueError as exc:
        print(f"vroll eval: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    for s in result.samples[:3]:
        print(f"  {s.question!r} -> {s.reply!r} ({'right' if s.correct else 'wrong'})")
    if cfg.output_json:
        path = Path(cfg.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``vroll eval`` entry point."""
    return run_config(parse_config(EvalConfig, argv, "vroll eval", __doc__.split("\n\n")[0]))


if __name__ == "__main__":
    sys.exit(main())
