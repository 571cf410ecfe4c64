"""The calculator task: its environment's turns and reward, and how its answers are tokenized."""

from __future__ import annotations

import pytest

from vroll.environments import as_messages
from vroll.generation.episodes import TurnRenderer
from vroll.protocol import ChatMessage
from vroll.tasks import load_environment
from vroll.tasks.calculator import ASKED_REWARD, RIGHT_CALL_REWARD, CalculatorEnvironment, calculator_rows, evaluate


def test_rows_are_deterministic_and_need_the_calculator():
    rows = calculator_rows(4, seed=0)
    assert rows == calculator_rows(4, seed=0) and rows != calculator_rows(4, seed=1)
    question = rows[0]["prompt"][0]["content"]
    a, b, c = (int(x) for x in question.rsplit("What is ", 1)[1].rstrip("?").replace("*", "+").split("+"))
    assert a >= 100 and int(rows[0]["answer"]) == a * b + c


def test_two_turns_ask_then_answer():
    row = {"prompt": [{"role": "user", "content": "What is 123 * 45 + 6?"}], "answer": "5541"}
    env = load_environment("calculator")(row)
    assert env.reset(row) == row["prompt"]
    first = env.step("Let me compute. <calc>123 * 45 + 6</calc>")
    assert not first.done and as_messages(first.messages, "step")[0].content == "Calculator: 5541"
    assert env.step("5541").reward == 1.0
    wrong = CalculatorEnvironment(row)
    wrong.step("<calc>123*45</calc>")
    assert wrong.step("5535").reward == ASKED_REWARD  # asked, but answered wrong
    relayed_wrong = CalculatorEnvironment(row)
    relayed_wrong.step("<calc>6 + 123 * 45</calc>")  # the right value, then not repeated
    assert relayed_wrong.step("5540").reward == RIGHT_CALL_REWARD > ASKED_REWARD == 0.0  # a call alone: nothing
    assert CalculatorEnvironment(row).step("5541").reward == 1.0  # no call needed when it knows
    assert CalculatorEnvironment(row).step("I do not know").reward == 0.0


@pytest.mark.parametrize(("expression", "value"), [("2 + 3 * 4", 14), ("(2 + 3) * 4", 20), ("-7 // 2", -4),
                                                   ("10 / 4", 2.5)])
def test_evaluate_computes_arithmetic(expression, value):
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression", ["__import__('os')", "2 ** 1000000", "1 / 0", "x + 1", "9" * 300])
def test_evaluate_refuses_anything_else(expression):
    with pytest.raises(ValueError):
        evaluate(expression)
    env = CalculatorEnvironment({"answer": "1"})
    assert env.step(f"<calc>{expression}</calc>").messages[0]["content"].startswith("Calculator: error:")


def test_unknown_environments_and_bad_messages_are_clear_errors():
    with pytest.raises(ValueError, match="unknown environment 'nope'; built-ins: calculator"):
        load_environment("nope")
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        load_environment("no_such_module:make")
    with pytest.raises(ValueError, match="message 0 is not a chat message"):
        as_messages([{"role": "tool"}], "MyEnv.step")
    with pytest.raises(ValueError, match="must return a list of chat messages, got str"):
        as_messages("hello", "MyEnv.step")


def test_an_answer_is_the_templates_delta_after_the_reply(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    renderer = TurnRenderer(tok)
    answer = [ChatMessage(role="user", content="Calculator: 3")]
    ended = tok("<calc>1+2</calc>", add_special_tokens=False).input_ids + [tok.eos_token_id]
    # the reply's own <|im_end|> is kept as sampled: only the template's newline after it is added
    assert tok.decode(renderer.after_reply(ended, answer)) == "\n<|im_start|>user\nCalculator: 3<|im_end|>\n" \
                                                              "<|im_start|>assistant\n"
    cut = tok("<calc>1+2", add_special_tokens=False).input_ids  # a reply that did not end: the template closes it
    assert tok.decode(renderer.after_reply(cut, answer)).startswith("<|im_end|>\n<|im_start|>user\n")
