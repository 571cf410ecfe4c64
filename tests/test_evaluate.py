"""``vroll eval``: the strict judge through the real backends (vLLM engine in process, transformers)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vroll.evaluate import EvalCallback, run_eval
from vroll.protocol import Completion, PromptResult
from vroll.tasks.addition import addition_rows

SRC = str(Path(__file__).resolve().parents[1] / "src")
FIELDS = {"model", "task", "split", "n", "backend", "max_tokens", "accuracy", "truncated_frac", "pass_k",
          "pass_at_k", "temperature", "seconds", "samples"}


class _Tok:
    """Just enough tokenizer for run_eval with a scripted generate (no model needed)."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return messages[-1]["content"]

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[len(text)])


def Reply(text: str, truncated: bool) -> Completion:  # noqa: N802 - reads like the type it builds
    return Completion([1], text, [], "length" if truncated else "stop")


def _scripted(replies_for):
    def generate(prompts, sampling):
        return [PromptResult(p.token_ids, [replies_for(i, k) for k in range(sampling.n)])
                for i, p in enumerate(prompts)]
    return generate


def test_run_eval_scores_strictly_with_controls():
    rows = addition_rows("test", 6)
    answers = [r["answer"] for r in rows]
    right = run_eval(_scripted(lambda i, k: Reply(answers[i], False)), _Tok(), model="m", backend="x", n=6)
    assert right.accuracy == 1.0 and right.truncated_frac == 0.0 and len(right.samples) == 6
    # negative controls: wrong answers, a correct first line followed by more, a cut reply
    wrong = run_eval(_scripted(lambda i, k: Reply(str(int(answers[i]) + 1), False)), _Tok(), model="m",
                     backend="x", n=6)
    rambling = run_eval(_scripted(lambda i, k: Reply(f"{answers[i]}\n12 + 3 = 15\n1", False)), _Tok(),
                        model="m", backend="x", n=6)
    cut = run_eval(_scripted(lambda i, k: Reply(answers[i], True)), _Tok(), model="m", backend="x", n=6)
    assert wrong.accuracy == rambling.accuracy == cut.accuracy == 0.0 and cut.truncated_frac == 1.0
    # pass@k: only the third of four samples is right
    some = run_eval(_scripted(lambda i, k: Reply(answers[i] if k == 2 else "0", False)), _Tok(), model="m",
                    backend="x", n=6, pass_k=4)
    assert some.accuracy == 0.0 and some.pass_at_k == 1.0 and some.pass_k == 4


def _eval_cli(tmp_path: Path, name: str, *flags: str) -> dict:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "vroll.cli", "eval", "--task", "addition", "--split", "test", "--n", "8",
           "--output_json", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "greedy accuracy" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.slow  # a colocated engine
@pytest.mark.timeout(1800)
def test_eval_cli_engine_and_transformers_agree(tmp_path):
    engine = _eval_cli(tmp_path, "engine", "--colocate", "--max_model_len", "512", "--kv_cache_memory_gib", "1")
    hf = _eval_cli(tmp_path, "hf", "--backend", "transformers")
    for result, backend in ((engine, "colocate"), (hf, "transformers")):
        assert set(result) == FIELDS
        assert (result["task"], result["split"], result["n"], result["backend"]) == ("addition", "test", 8, backend)
        assert len(result["samples"]) == 8 and 0.0 <= result["accuracy"] <= 1.0
        # accuracy is the strict judge's mean over the very replies written out
        assert result["accuracy"] == sum(s["correct"] for s in result["samples"]) / 8
    assert [s["question"] for s in engine["samples"]] == [s["question"] for s in hf["samples"]]
    # Greedy decoding of the same weights: vLLM (bf16 kernels) and transformers (fp32) may split on a
    # near tie, so most replies, not all, must be identical, and the accuracies close.
    same = sum(a["reply"] == b["reply"] for a, b in zip(engine["samples"], hf["samples"], strict=True))
    assert same >= 5, [(a["reply"], b["reply"]) for a, b in zip(engine["samples"], hf["samples"], strict=True)]
    assert abs(engine["accuracy"] - hf["accuracy"]) <= 0.25


def test_eval_cli_rejects_bad_input(tmp_path, capsys):
    from vroll.evaluate import main

    assert main(["--task", "gsm8k", "--n", "4"]) == 2
    assert "built-in tasks: addition" in capsys.readouterr().err
    assert main(["--n", "0"]) == 2
    assert "n must be in" in capsys.readouterr().err


def test_eval_callback_on_a_live_policy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vroll.models import resolve_model

    path = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(path).train()
    tok = AutoTokenizer.from_pretrained(path)
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=3), model=model, tokenizer=tok,
                              accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    callback = EvalCallback(eval_steps=2, n=4, max_tokens=8)
    metrics: dict = {}
    callback(trainer, metrics)
    assert metrics == {} and callback.last is None  # not an eval step
    trainer.state.global_step = 4
    callback(trainer, metrics)
    assert set(metrics) == {"eval/accuracy", "eval/truncated_frac"}
    assert callback.last is not None and len(callback.last.samples) == 4
    assert model.training  # the policy is handed back in training mode
    with pytest.raises(ValueError, match="eval_steps"):
        EvalCallback(eval_steps=0)


def test_transformers_generator_ends_replies_at_any_eos_of_the_generation_config(hf_model):
    """One transformers generator for eval and plain-mode training: a reply that ends in an EOS id of the
    generation config (not the tokenizer's) ended; it is not truncated. Negative control: the trainer's
    old cut, which knew the tokenizer's EOS only, calls that very reply truncated."""
    from transformers import AutoTokenizer

    from vroll.generation.plain import TransformersGenerator
    from vroll.generation.prompts import encode_prompts
    from vroll.models import resolve_model
    from vroll.protocol import SamplingSpec

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    prompts = encode_prompts(tok, [addition_rows("test", 1)[0]["prompt"]], None)
    greedy = SamplingSpec(temperature=0.0, max_tokens=8)
    plain = TransformersGenerator(hf_model, tok).results(prompts, greedy)[0].completions[0]
    assert plain.finish_reason == "length" and len(plain.token_ids) == 8  # no EOS within 8 tokens
    assert TransformersGenerator(hf_model, tok).results(prompts, greedy)[0].completions[0] == plain  # greedy
    k = next(i for i, t in enumerate(plain.token_ids) if i and t not in plain.token_ids[:i])
    other_eos = plain.token_ids[k]
    saved = hf_model.generation_config.eos_token_id
    hf_model.generation_config.eos_token_id = [tok.eos_token_id, other_eos]
    try:
        generator = TransformersGenerator(hf_model, tok)
        reply = generator.results(prompts, greedy)[0].completions[0]
        rollout = generator.generate(prompts, greedy)
    finally:
        hf_model.generation_config.eos_token_id = saved
    assert reply.token_ids == plain.token_ids[: k + 1] and reply.finish_reason == "stop"
    assert reply.text == tok.decode(plain.token_ids[:k], skip_special_tokens=True)
    assert rollout.truncated == [False] and rollout.completion_ids == [reply.token_ids]
    old_cut_truncated = tok.eos_token_id not in reply.token_ids  # the trainer's cut before the fix
    assert old_cut_truncated


def test_eval_rec_task_with_images_scripted_and_on_a_tiny_vlm(tmp_path):
    from transformers import AutoTokenizer

    from vroll.evaluate import evaluate
    from vroll.tasks.rec import rec_rows
    from vroll.testing import build_tiny_vlm

    path = str(build_tiny_vlm(tmp_path / "vlm", family="qwen2_5_vl"))
    tok = AutoTokenizer.from_pretrained(path)
    sols = [r["solution"] for r in rec_rows("test", 3)]
    seen = []

    def answer(i, k):
        return Reply(f"<think>found it</think><answer>{sols[i]}</answer>", False)

    def generate(prompts, sampling):
        seen.extend(len(p.images) for p in prompts)
        return _scripted(answer)(prompts, sampling)

    right = run_eval(generate, tok, model="m", backend="x", task="rec", n=3)
    assert right.accuracy == 1.0 and seen == [1, 1, 1]  # every prompt went out with its image
    assert right.samples[0].answer == str(sols[0]) and right.samples[0].question.startswith("the ")
    real = evaluate(path, task="rec", n=2, max_tokens=4, backend="transformers")
    assert real.n == 2 and len(real.samples) == 2 and real.accuracy == 0.0  # random weights find no box


def _calculator_model(tok, policy):
    """A scripted generate for the calculator task: ``policy(question_numbers, calculator_value)`` -> reply text,
    with the reply's real token ids (ending in the template's end token) as the episode driver needs them."""
    import re

    def generate(prompts, sampling):
        out = []
        for p in prompts:
            text = tok.decode(p.token_ids)
            a, b, c = map(int, re.findall(r"What is (\d+) \* (\d+) \+ (\d+)\?", text)[-1])
            seen = re.findall(r"Calculator: (-?\d+)", text)
            reply = policy((a, b, c), seen[-1] if seen else None)
            ids = tok(reply + tok.eos_token, add_special_tokens=False).input_ids[: sampling.max_tokens]
            cut = len(ids) == sampling.max_tokens and ids[-1] != tok.eos_token_id
            out.append(PromptResult(p.token_ids, [Completion(ids, reply, [], "length" if cut else "stop")]))
        return out
    return generate


def test_calculator_eval_runs_whole_episodes_with_controls(model_path):
    """``vroll eval --task calculator``: greedy episodes in the environment, the final reply judged strictly.
    Controls: asking and then answering wrong, a right number with more after it, answering right without the
    calculator (right: the environment agrees), an episode that never ends within max_turns or the budget."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)

    def run(policy, **kw):
        return run_eval(_calculator_model(tok, policy), tok, model="m", backend="x", task="calculator", n=5, **kw)

    def ask(q, value):
        return value if value is not None else f"<calc>{q[0]} * {q[1]} + {q[2]}</calc>"

    right = run(ask)
    assert right.accuracy == 1.0 and right.max_tokens == 96 and right.truncated_frac == 0.0
    assert right.samples[0].reply.startswith("[assistant] <calc>") and "[user] Calculator: " in right.samples[0].reply
    assert run(lambda q, v: str(q[0] * q[1] + q[2])).accuracy == 1.0  # no call needed when it knows
    assert run(lambda q, v: str(int(v) + 1) if v else ask(q, v)).accuracy == 0.0
    assert run(lambda q, v: f"{v}\n{v}" if v else ask(q, v)).accuracy == 0.0
    forever = run(lambda q, v: ask(q, None))  # asks again and again: max_turns, never an answer
    assert forever.accuracy == 0.0 and forever.truncated_frac == 1.0
    short = run(ask, max_tokens=20)  # the answer does not fit in what is left after the calculator's
    assert short.accuracy == 0.0 and short.truncated_frac == 1.0
    some = run(lambda q, v: ask(q, v), pass_k=3)
    assert some.pass_at_k == 1.0 and some.pass_k == 3


def test_calculator_splits_are_disjoint_and_deterministic():
    from vroll.tasks import get_task
    from vroll.tasks.calculator import calculator_rows

    task = get_task("calculator")
    test = task.rows("test", 200)
    train = calculator_rows(2000, seed=0) + calculator_rows(2000, seed=1)
    assert task.rows("test", 200) == test and len({r["prompt"][0]["content"] for r in test}) == 200
    assert not {r["prompt"][0]["content"] for r in test} & {r["prompt"][0]["content"] for r in train}
    with pytest.raises(ValueError, match="split must be"):
        calculator_rows(3, 0, "dev")
