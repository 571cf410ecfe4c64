"""A two-turn task for ``--environment calculator``: ask the calculator, then state its answer.

``a * b + c`` with a three-digit ``a`` is beyond a small model's mental arithmetic, so it has
to ask: its first reply writes the expression inside ``<calc>...</calc>``, the environment
answers with the value (as a user turn, which every chat template renders), and its next
reply must be just the number. ``vroll grpo --dataset_name calculator --environment calculator``.

Reward, at the end of the episode: 1.0 for the right number; 0.5 for a wrong one after the
calculator had shown the right value (it only had to repeat it); 0.0 otherwise. A call alone
earns nothing: any reward for it is hacked. With 0.2 for any call, SmolLM2-135M went from 6%
to 100% of episodes calling in 25 CPU steps, mostly with junk (``<calc>1.26</calc>``); with 0.1
for a call and 0.5 for the right value, 50 steps ended with every episode calling
``<calc>1.5</calc>``-like junk, reward exactly 0.1, held-out accuracy 0% before and after
(docs/demo/calculator_shaping/).
"""

from __future__ import annotations

import ast
import operator
import random
import re
import zlib
from typing import Any

from vroll.environments import StepResult
from vroll.tasks import SPLITS, Task
from vroll.tasks.addition import extract_answer

CALC_RE = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
MAX_EXPRESSION_CHARS = 200
ASKED_REWARD = 0.0  # a wrong final answer after a call that did not show the right value (see above)
RIGHT_CALL_REWARD = 0.5  # a wrong final answer after the calculator had shown the right value
SPLIT_SEED = 0
MAX_TOKENS = 96  # an episode's budget (both replies and the calculator's answer): ~35 tokens when done right
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.Div: operator.truediv}
INSTRUCTIONS = ("Use the calculator. First reply with only the expression inside <calc></calc>, for example "
                "<calc>12 * 7 + 5</calc>; the calculator answers with its value. Then reply with just the number.")


def split_of(a: int, b: int, c: int) -> str:
    """The split a problem belongs to: one in ten is held out, by a hash of the problem itself,
    so training rows (any seed, any size) never contain a test problem."""
    return "test" if zlib.crc32(f"{a}*{b}+{c}".encode()) % 10 == 0 else "train"


def calculator_rows(n: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """``n`` distinct problems ``a * b + c`` (a: 100-999, b: 11-99, c: 10-999) of ``split``, the same for a seed."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, int, int]] = set()
    while len(rows) < n:
        a, b, c = rng.randint(100, 999), rng.randint(11, 99), rng.randint(10, 999)
        if (a, b, c) in seen or split_of(a, b, c) != split:
            continue
        seen.add((a, b, c))
        question = f"{INSTRUCTIONS}\n\nWhat is {a} * {b} + {c}?"
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(a * b + c)})
    return rows


def calculator_split_rows(split: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of the standard split (seed 0), for ``vroll eval --task calculator``."""
    return calculator_rows(n, SPLIT_SEED, split)


def calculator_correct(prompts: list[Any], completions: list[Any], answer: list[str],
                       truncated: list[bool] | None = None, **kwargs: Any) -> list[float]:
    """1.0 if an episode's final reply is the right number, strictly (as the addition task judges), else 0.0."""
    from vroll.tasks.addition import addition_correct

    return addition_correct(prompts, completions, answer, truncated)


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression (numbers, + - * / // %, parentheses); ValueError otherwise."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression.strip()!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        try:
            return _OPS[type(node.op)](_value(node.left), _value(node.right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
    raise ValueError(f"only numbers and + - * / // % are allowed, not {type(node).__name__}")


class CalculatorEnvironment:
    """One episode of the calculator task (the factory of ``--environment calculator``)."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.answer = int(row["answer"])
        self.asked = False
        self.shown_answer = False  # the calculator has shown the right value

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return row["prompt"]

    def step(self, reply: str) -> StepResult:
        call = CALC_RE.search(reply)
        if call is None:  # no calculator call: this is the final answer
            return StepResult([], done=True, reward=self._reward(extract_answer(reply) == self.answer))
        self.asked = True
        try:
            value = evaluate(call.group(1))
            self.shown_answer = self.shown_answer or value == self.answer
            shown = str(int(value)) if float(value).is_integer() else f"{value:.6g}"
        except ValueError as exc:
            shown = f"error: {exc}"
        return StepResult([{"role": "user", "content": f"Calculator: {shown}"}], done=False)

    def _reward(self, right: bool) -> float:
        if right:
            return 1.0
        return RIGHT_CALL_REWARD if self.shown_answer else ASKED_REWARD if self.asked else 0.0


TASK = Task("calculator", rows=calculator_split_rows, correct=calculator_correct, environment=CalculatorEnvironment,
            # without --environment (which scores with the episodes' own reward) the final replies are judged
            # as the addition task's are: its answer column
            default_rewards=("addition_correct", "addition_format"),
            dataset=lambda size, seed: calculator_rows(size, seed), max_tokens=MAX_TOKENS)
