"""``--tools``: tool calls parsed, run with a timeout and answered; the schemas reach the prompt."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vroll.generation.episodes import TurnRenderer, episode_runner
from vroll.protocol import ChatMessage
from vroll.tools import ToolEnvironment, load_tools, parse_tool_calls, tool_schemas
from vroll.trainer.config import GRPOConfig


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def slow(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "woke up"


def undocumented(a, b):  # noqa: ANN001, ANN201 - what --tools must refuse
    return a


def call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


@pytest.fixture
def env():
    pool = ThreadPoolExecutor(2)
    yield ToolEnvironment({"multiply": multiply, "slow": slow}, timeout=0.3, pool=pool)
    pool.shutdown(wait=False)


def test_calls_are_run_and_answered_as_tool_messages(env):
    reply = "Let me compute. " + call("multiply", '{"a": 123, "b": 45}') + call("multiply", '{"a": 2, "b": 3}')
    result = env.step(reply)
    assert not result.done and result.messages == [{"role": "tool", "content": "5535"},
                                                   {"role": "tool", "content": "6"}]
    final = env.step("The answer is 5535.")  # no call: the episode ends, --reward_funcs score this reply
    assert final.done and final.reward is None and final.messages == []


@pytest.mark.parametrize(("reply", "answer"), [
    (call("divide", '{"a": 1}'), "error: no tool 'divide'; tools: multiply, slow"),
    (call("multiply", '{"a": 1}'), "error: TypeError: multiply() missing 1 required positional argument: 'b'"),
    (call("slow", '{"seconds": 2}'), "error: slow timed out after 0.3 s"),
    ("<tool_call>{not json}</tool_call>", "error: the tool call is not JSON (Expecting property name enclosed in "
                                         "double quotes)"),
    ('<tool_call>["multiply"]</tool_call>', 'error: a tool call is {"name": ..., "arguments": {...}}'),
])
def test_a_bad_call_is_answered_with_an_error_for_the_model(env, reply, answer):
    start = time.perf_counter()
    result = env.step(reply)
    assert not result.done and result.messages == [{"role": "tool", "content": answer}]
    assert time.perf_counter() - start < 1.5  # a slow tool does not hold the episode past its timeout


def test_tools_need_hints_docstrings_and_distinct_names():
    assert [f.__name__ for f in load_tools(["test_tools:multiply"])] == ["multiply"]
    assert tool_schemas([multiply])[0]["function"]["parameters"]["required"] == ["a", "b"]
    with pytest.raises(ValueError, match="tool 'undocumented'.*Args: section"):
        load_tools(["test_tools:undocumented"])
    with pytest.raises(ValueError, match="two tools share a name"):
        load_tools(["test_tools:multiply", "test_tools:multiply"])
    with pytest.raises(ValueError, match="tool 'test_tools:nope'"):
        load_tools(["test_tools:nope"])
    assert parse_tool_calls("no calls here") == []


@pytest.mark.parametrize(("kw", "message"), [
    (dict(tools=["test_tools:multiply"], environment="calculator"), "not both"),
    (dict(tools=["multiply"]), "'package.module:function'"),
    (dict(tools=["test_tools:multiply"], tool_timeout=0), "tool_timeout must be > 0"),
    (dict(tools=["test_tools:multiply"], vllm_mode="colocate", vllm_tensor_parallel_size=2), "not supported yet"),
])
def test_tools_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**kw)


def test_the_schemas_reach_a_template_that_ignores_tools(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)  # SmolLM2's template renders no tools: a system message does
    runner = episode_runner(tok, tools=["test_tools:multiply"], max_turns=4, max_prompt_length=512,
                            max_completion_length=64)
    assert isinstance(runner._start({"prompt": "Hi"}).env, ToolEnvironment)
    episode = runner._start({"prompt": [{"role": "user", "content": "What is 123 * 45?"}]})
    text = tok.decode(episode.prompt_ids)
    assert text.startswith("<|im_start|>system\nYou may call one or more functions") and '"name": "multiply"' in text
    assert text.endswith("What is 123 * 45?<|im_end|>\n<|im_start|>assistant\n")
    answer = TurnRenderer(tok).after_reply([tok.eos_token_id], [ChatMessage(role="tool", content="5535")])
    assert tok.decode(answer) == "\n<|im_start|>tool\n5535<|im_end|>\n<|im_start|>assistant\n"
