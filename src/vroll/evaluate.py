"""``vroll eval``: strict accuracy of a model on a built-in task's held-out split.

    vroll eval --model runs/demo/final --task addition --split test --n 200 --output_json eval.json

Greedy accuracy (and pass@k over k sampled replies, with ``--pass_k``) scored by the task's
strict judge: the whole reply must be the answer and must end (EOS) within ``--max_tokens``.
Replies come from one of three backends, all fed the same chat-templated token ids:

- ``--server URL``: a running ``vroll serve`` (whatever weights it serves now);
- ``--colocate``: a vLLM engine in this process (``vroll.engine.vllm_adapter.VLLMEngine``);
- ``--backend transformers`` (the default): ``generate()`` with transformers, no vLLM.

:class:`EvalCallback` runs the same evaluation on a trainer's live policy every ``eval_steps``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vroll.tasks import SPLITS, get_task

BACKENDS = ("transformers", "colocate", "server")


@dataclass(frozen=True)
class Reply:
    """One generated reply; ``truncated``: cut at ``max_tokens`` without EOS."""

    text: str
    truncated: bool


# (prompt token ids, replies per prompt, temperature (0: greedy), max tokens, seed) -> replies per prompt
Generate = Callable[[list[list[int]], int, float, int, int], list[list[Reply]]]


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


def encode_chat(tokenizer: Any, rows: list[dict[str, Any]]) -> list[list[int]]:
    """Each row's prompt through the chat template, as the trainer encodes it."""
    from vroll.trainer.rollout import encode_prompts

    return [p.token_ids for p in encode_prompts(tokenizer, [r["prompt"] for r in rows], None)]


def score_replies(task_name: str, rows: list[dict[str, Any]], replies: list[Reply]) -> list[bool]:
    """The task's strict judge on one reply per row (truncated replies score 0)."""
    task = get_task(task_name)
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    scores = task.correct([r["prompt"] for r in rows], [x.text for x in replies],
                          truncated=[x.truncated for x in replies], **columns)
    return [s == 1.0 for s in scores]


def run_eval(generate: Generate, tokenizer: Any, *, model: str, backend: str, task: str = "addition",
             split: str = "test", n: int = 200, max_tokens: int = 24, pass_k: int | None = None,
             temperature: float = 1.0, seed: int = 0) -> EvalResult:
    """Evaluate with a ready ``generate`` function (any backend, or a trainer's live policy)."""
    if pass_k is not None and pass_k < 1:
        raise ValueError(f"pass_k must be >= 1, got {pass_k}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    rows = get_task(task).rows(split, n)
    ids = encode_chat(tokenizer, rows)
    start = time.perf_counter()
    greedy = [group[0] for group in generate(ids, 1, 0.0, max_tokens, seed)]
    correct = score_replies(task, rows, greedy)
    result = EvalResult(model=model, task=task, split=split, n=n, backend=backend, max_tokens=max_tokens,
                        accuracy=sum(correct) / n, truncated_frac=sum(r.truncated for r in greedy) / n)
    result.samples = [EvalSample(r["prompt"][-1]["content"], str(r["answer"]), g.text, g.truncated, ok)
                      for r, g, ok in zip(rows, greedy, correct, strict=True)]
    if pass_k:
        sampled = generate(ids, pass_k, temperature, max_tokens, seed)
        hits = [any(score_replies(task, [row] * pass_k, group)) for row, group in zip(rows, sampled, strict=True)]
        result.pass_k, result.pass_at_k, result.temperature = pass_k, sum(hits) / n, temperature
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------- backends


def transformers_generate(model: Any, tokenizer: Any, batch_size: int = 64) -> Generate:
    """``model.generate()`` in batches, left-padded; greedy when temperature is 0."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate(prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int,
                 seed: int) -> list[list[Reply]]:
        device = next(model.parameters()).device
        sampling = {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": 1.0} \
            if temperature > 0 else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        torch.manual_seed(seed)
        out: list[list[Reply]] = []
        for first in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[first : first + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 num_return_sequences=n, pad_token_id=pad, **sampling)[:, width:].tolist()
            for i in range(len(batch)):
                out.append([_cut(row, eos_ids, tokenizer) for row in gen[i * n : (i + 1) * n]])
        return out

    return generate


def _cut(row: list[int], eos_ids: set[int], tokenizer: Any) -> Reply:
    end = next((i for i, t in enumerate(row) if t in eos_ids), None)
    kept = row if end is None else row[:end]
    return Reply(tokenizer.decode(kept, skip_special_tokens=True), truncated=end is None)


def _replies(results: list[Any]) -> list[list[Reply]]:
    """vLLM-style per-prompt results (server or engine) -> replies; "length" means truncated."""
    return [[Reply(c.text, c.finish_reason == "length") for c in r.completions] for r in results]


def server_generate(client: Any) -> Generate:
    """Replies from a running ``vroll serve`` through a :class:`vroll.client.GenerationClient`."""

    def generate(prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int,
                 seed: int) -> list[list[Reply]]:
        out = client.generate(prompt_ids, n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
        return _replies(out.results)

    return generate


def engine_generate(engine: Any) -> Generate:
    """Replies from an in-process :class:`vroll.engine.vllm_adapter.VLLMEngine`."""
    from vroll.protocol import GenerateJob, PromptInput, SamplingSpec

    def generate(prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int,
                 seed: int) -> list[list[Reply]]:
        spec = SamplingSpec(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
        return _replies(engine.generate(GenerateJob([PromptInput(p) for p in prompt_ids], spec, first_index=0)))

    return generate


@contextmanager
def open_backend(backend: str, model_path: str, server_url: str | None = None,
                 max_model_len: int = 1024, kv_cache_memory_gib: float | None = None) -> Iterator[Generate]:
    """A ``Generate`` for ``backend``, closed (engine freed, connection shut) on exit."""
    if backend == "server":
        from vroll.client import GenerationClient

        if not server_url:
            raise ValueError("the server backend needs --server URL")
        with GenerationClient(server_url) as client:
            client.wait_until_ready(timeout=60)
            yield server_generate(client)
    elif backend == "colocate":
        from vroll.engine.vllm_adapter import VLLMEngine
        from vroll.protocol import EngineSpec

        engine = VLLMEngine(EngineSpec(model=model_path, served_name=model_path, enforce_eager=True,
                                       max_model_len=max_model_len, kv_cache_memory_gib=kv_cache_memory_gib))
        try:
            yield engine_generate(engine)
        finally:
            del engine
    elif backend == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
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
             max_tokens: int = 24, temperature: float = 1.0, seed: int = 0, max_model_len: int = 1024,
             kv_cache_memory_gib: float | None = None) -> EvalResult:
    """Strict accuracy of ``model`` (a folder, a Hub id, or None: the embedded model) on ``task``.

    With ``backend="server"`` the replies come from the server at ``server_url`` (its current
    weights); ``model`` then only names the tokenizer that renders the prompts.
    """
    from vroll.models import resolve_model

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    get_task(task)  # an unknown task fails before a model loads
    path = resolve_model(model)
    with open_backend(backend, path, server_url, max_model_len, kv_cache_memory_gib) as generate:
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
                 max_tokens: int = 24) -> None:
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


# ---------------------------------------------------------------------------- CLI


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the embedded model)")
    parser.add_argument("--task", default="addition", help="built-in task (addition)")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--n", type=int, default=200, help="problems (the split's first n)")
    parser.add_argument("--pass_k", "--pass-k", type=int, default=None, help="also pass@k over k sampled replies")
    parser.add_argument("--temperature", type=float, default=1.0, help="of the pass@k samples")
    parser.add_argument("--max_tokens", "--max-tokens", type=int, default=24, help="reply length limit")
    parser.add_argument("--seed", type=int, default=0)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--server", default=None, metavar="URL", help="a running vroll serve")
    where.add_argument("--colocate", action="store_true", help="a vLLM engine in this process")
    where.add_argument("--backend", choices=BACKENDS, default=None, help="default: transformers")
    parser.add_argument("--max_model_len", "--max-model-len", type=int, default=1024, help="colocate engine")
    parser.add_argument("--kv_cache_memory_gib", "--kv-cache-memory-gib", type=float, default=None,
                        help="colocate engine KV cache (CPU: e.g. 1)")
    parser.add_argument("--output_json", "--output-json", default=None, help="write the result here")


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on an ``argparse`` subparsers object; returns its parser."""
    parser = subparsers.add_parser("eval", help="strict accuracy of a model on a built-in task")
    _add_arguments(parser)
    parser.set_defaults(handler=_run_args)
    return parser


def _run_args(args: argparse.Namespace) -> int:
    backend = "server" if args.server else "colocate" if args.colocate else args.backend or "transformers"
    try:
        result = evaluate(args.model, task=args.task, split=args.split, n=args.n, pass_k=args.pass_k,
                          backend=backend, server_url=args.server, max_tokens=args.max_tokens,
                          temperature=args.temperature, seed=args.seed, max_model_len=args.max_model_len,
                          kv_cache_memory_gib=args.kv_cache_memory_gib)
    except ValueError as exc:
        print(f"vroll eval: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    for s in result.samples[:3]:
        print(f"  {s.question!r} -> {s.reply!r} ({'right' if s.correct else 'wrong'})")
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``vroll eval`` entry point."""
    parser = argparse.ArgumentParser(prog="vroll eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return _run_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
