"""``--tools module:function ...``: stateless functions the model may call, as a built-in environment.

The model calls a tool in the Hermes format that Qwen2.5's chat template (and many others) teach:
``<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>``. Each call runs in a
thread pool with a timeout and its result comes back as a ``role: tool`` message; a reply without
a call ends the episode, and ``--reward_funcs`` score that last reply. A bad call (unknown tool,
bad JSON, wrong arguments, an exception, a timeout) is answered with an ``error: ...`` tool
message: the model's mistake to learn from, not the environment's failure.

A tool is a Python function with type hints and a Google-style docstring (``Args:``), from which
``transformers.utils.get_json_schema`` builds its JSON schema for the chat template
(``apply_chat_template(..., tools=...)``). For a template that ignores ``tools`` (SmolLM2's), the
schemas and the call format are given in a system message instead (:func:`tools_system_prompt`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from vroll.environments import EnvironmentFactory, StepResult
from vroll.plugins import import_callable
from vroll.rows import prompt_of

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
MAX_RESULT_CHARS = 2000  # a tool's answer is cut here: it is context the next reply pays for


def load_tools(specs: list[str]) -> list[Callable[..., Any]]:
    """The functions ``--tools`` names (``package.module:function``), each with a usable schema."""
    funcs = [import_callable(spec, "tool") for spec in specs]
    tool_schemas(funcs)  # fail at start on a function without type hints or docstring
    names = [f.__name__ for f in funcs]
    if len(set(names)) != len(names):
        raise ValueError(f"--tools: two tools share a name ({', '.join(names)}); the model calls them by name")
    return funcs


def tool_schemas(funcs: list[Callable[..., Any]]) -> list[dict[str, Any]]:
    """Each function's JSON schema, as chat templates take them."""
    from transformers.utils import get_json_schema

    out = []
    for f in funcs:
        try:
            out.append(get_json_schema(f))
        except Exception as exc:  # transformers' DocstringParsingException / TypeHintParsingException
            raise ValueError(f"tool {getattr(f, '__name__', f)!r}: {exc} (a tool needs type hints and a "
                             f"Google-style docstring with an Args: section)") from None
    return out


def tools_system_prompt(schemas: list[dict[str, Any]]) -> str:
    """The tools and the call format, for a chat template that does not render ``tools`` itself (Qwen2.5's text)."""
    listed = "\n".join(json.dumps(s) for s in schemas)
    return ("You may call one or more functions to assist with the user query.\n\nYou are provided with function "
            f"signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\nFor each function call, "
            "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def parse_tool_calls(reply: str) -> list[tuple[str, dict[str, Any]] | str]:
    """Each ``<tool_call>`` of a reply: ``(name, arguments)``, or the reason it cannot be called."""
    calls: list[tuple[str, dict[str, Any]] | str] = []
    for body in TOOL_CALL_RE.findall(reply):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as exc:
            calls.append(f"error: the tool call is not JSON ({exc.msg})")
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append('error: a tool call is {"name": ..., "arguments": {...}}')
            continue
        args = call.get("arguments", {})
        calls.append((call["name"], args) if isinstance(args, dict) else "error: arguments must be a JSON object")
    return calls


class ToolEnvironment:
    """One episode with ``--tools``: answers each reply's tool calls, ends at a reply without any."""

    def __init__(self, tools: dict[str, Callable[..., Any]], timeout: float, pool: ThreadPoolExecutor) -> None:
        self.tools = tools
        self.timeout = timeout
        self.pool = pool

    def reset(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt = prompt_of(row)
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)

    def step(self, reply: str) -> StepResult:
        calls = parse_tool_calls(reply)
        if not calls:
            return StepResult([], done=True)  # the final answer: --reward_funcs score it
        return StepResult([{"role": "tool", "content": self._call(c)} for c in calls], done=False)

    def _call(self, call: tuple[str, dict[str, Any]] | str) -> str:
        if isinstance(call, str):
            return call
        name, args = call
        if name not in self.tools:
            return f"error: no tool {name!r}; tools: {', '.join(sorted(self.tools))}"
        future = self.pool.submit(self.tools[name], **args)
        try:
            result = future.result(timeout=self.timeout)
        except FutureTimeout:  # the thread runs on (Python cannot stop it); the episode goes on without it
            return f"error: {name} timed out after {self.timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - the call's error is the model's to read
            return f"error: {type(exc).__name__}: {exc}"
        text = result if isinstance(result, str) else json.dumps(result, default=str)
        return text[:MAX_RESULT_CHARS]


def tool_environment(funcs: list[Callable[..., Any]], timeout: float, workers: int = 8) -> EnvironmentFactory:
    """The factory of ``--tools``: every episode shares the functions and one thread pool."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vroll-tool")
    tools = {f.__name__: f for f in funcs}
    return lambda row: ToolEnvironment(tools, timeout, pool)
