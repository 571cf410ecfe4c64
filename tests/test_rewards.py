import asyncio
import math

import pytest
import torch

from vroll.rewards import (
    RewardFunctionError,
    RewardModel,
    RewardScores,
    builtin_reward_funcs,
    completion_text,
    positional_reward_funcs,
    resolve_reward_funcs,
    reward_completions,
    score,
)
from vroll.tasks.addition import addition_correct

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["a", "bb", "ccc"]


def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def only_long(prompts, completions, **kwargs):
    return [1.0 if len(c) > 1 else None for c in completions]


# ---------------------------------------------------------------- resolve


def test_resolve_builtin_module_and_callable():
    resolved = resolve_reward_funcs(
        ["addition_correct", "vroll.tasks.addition:addition_format", length]
    )
    names = [name for name, _ in resolved]
    assert names == ["addition_correct", "vroll.tasks.addition:addition_format", "length"]
    assert resolved[0][1] is addition_correct
    assert resolved[1][1] is builtin_reward_funcs()["addition_format"]
    assert resolved[2][1] is length


def test_vowel_share_varies_on_random_text_so_every_group_trains():
    """The built-in reward for random-weight speed runs: it tells apart completions a task reward scores alike."""
    [(name, vowel_share)] = resolve_reward_funcs(["vowel_share"])
    texts = ["xq zt", "aeiou", "banana", "", "AE"]
    assert name == "vowel_share" and vowel_share(["p"] * 5, texts) == [0.0, 1.0, 0.5, 0.0, 0.0]
    assert len(set(vowel_share(["p"] * 3, ["ptk!a", "ooh hello", "Ernest"]))) == 3  # distinct scores: nonzero std
    assert addition_correct(["What is 1 + 1?"] * 3, ["ptk!a", "ooh hello", "Ernest"], answer=["2"] * 3) == [0.0] * 3


def test_builtin_registry_is_a_fresh_dict():
    builtin_reward_funcs()["addition_correct"] = None
    assert builtin_reward_funcs()["addition_correct"] is addition_correct


def test_unknown_name_lists_builtins_and_syntax():
    with pytest.raises(ValueError, match="addition_correct.*module:function"):
        resolve_reward_funcs(["nope"])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_module_xyz:f", "cannot import"),
        ("vroll.tasks.addition:missing", "has no 'missing'"),
        ("math:pi", "not callable"),
    ],
)
def test_bad_module_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_reward_funcs([spec])


# ---------------------------------------------------------------- score


def test_score_weights_none_and_columns():
    seen = {}

    def with_column(prompts, completions, answer, **kwargs):
        seen["answer"] = answer
        return [0.0, 1.0, 0.0]

    funcs = [("length", length), ("only_long", only_long), ("col", with_column)]
    out = score(funcs, [1.0, 2.0, 1.0], PROMPTS, COMPLETIONS, {"answer": ["x", "y", "z"]})
    assert isinstance(out, RewardScores)
    assert out.names == ["length", "only_long", "col"]
    assert out.per_func.shape == (3, 3)
    assert math.isnan(out.per_func[0, 1].item())
    torch.testing.assert_close(out.total, torch.tensor([1.0, 5.0, 5.0]))
    assert seen["answer"] == ["x", "y", "z"]


def test_score_default_weights_are_one():
    out = score([("length", length), ("l2", length)], None, PROMPTS, COMPLETIONS, {})
    torch.testing.assert_close(out.total, torch.tensor([2.0, 4.0, 6.0]))


def test_weight_count_mismatch():
    with pytest.raises(ValueError, match="2 reward weights for 1"):
        score([("length", length)], [1.0, 2.0], PROMPTS, COMPLETIONS, {})


def test_column_length_mismatch():
    with pytest.raises(ValueError, match="column 'answer'"):
        score([("length", length)], None, PROMPTS, COMPLETIONS, {"answer": ["x"]})


def test_raising_function_is_named():
    def boom(prompts, completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RewardFunctionError, match="'my_mod:boom' raised KeyError"):
        score([("my_mod:boom", boom)], None, PROMPTS, COMPLETIONS, {})


def test_wrong_count_message():
    def three(prompts, completions, **kwargs):
        return [1.0, 2.0, 3.0]

    completions = ["c"] * 8
    with pytest.raises(RewardFunctionError) as info:
        score([("my_mod:f", three)], None, ["p"] * 8, completions, {})
    assert str(info.value) == "reward function 'my_mod:f' returned 3 scores for 8 completions"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [["1", 2.0, 3.0], "abc", 5.0, [float("inf"), 0.0, 0.0]])
def test_non_numeric_output(bad):
    with pytest.raises(RewardFunctionError, match="'bad'"):
        score([("bad", lambda p, c, **k: bad)], None, PROMPTS, COMPLETIONS, {})


def test_tensor_output_is_accepted():
    out = score(
        [("t", lambda p, c, **k: torch.tensor([1.0, 2.0, 3.0]))], None, PROMPTS, COMPLETIONS, {}
    )
    torch.testing.assert_close(out.total, torch.tensor([1.0, 2.0, 3.0]))


def test_async_functions_run_concurrently():
    # Each waits for the other's event: this only finishes if both run at the same time.
    events = {}

    def make(me, other):
        async def func(prompts, completions, **kwargs):
            events.setdefault(me, asyncio.Event()).set()
            await asyncio.wait_for(events.setdefault(other, asyncio.Event()).wait(), 5.0)
            return [1.0] * len(completions)

        return func

    funcs = [("a", make("a", "b")), ("sync", length), ("b", make("b", "a"))]
    out = score(funcs, None, PROMPTS, COMPLETIONS, {})
    torch.testing.assert_close(out.total, torch.tensor([3.0, 4.0, 5.0]))


def test_async_function_inside_running_loop_and_errors():
    async def ok(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [0.5] * len(completions)

    async def fails(prompts, completions, **kwargs):
        raise RuntimeError("judge down")

    async def main():
        good = score([("ok", ok)], None, PROMPTS, COMPLETIONS, {})
        with pytest.raises(RewardFunctionError, match="'fails' raised RuntimeError: judge down"):
            score([("ok", ok), ("fails", fails)], None, PROMPTS, COMPLETIONS, {})
        return good

    torch.testing.assert_close(asyncio.run(main()).total, torch.full((3,), 0.5))


def test_truncated_reaches_functions_that_take_it():
    seen = {}

    def named(prompts, completions, answer, truncated):
        seen["named"] = truncated
        return [0.0] * len(completions)

    def kwargs(prompts, completions, **kw):
        seen["kwargs"] = kw["truncated"]
        return [0.0] * len(completions)

    def old_style(prompts, completions, answer):  # takes neither: called as before
        return [1.0] * len(completions)

    funcs = [("named", named), ("kwargs", kwargs), ("old", old_style)]
    out = score(funcs, None, PROMPTS, COMPLETIONS, {"answer": ["x"] * 3}, truncated=[True, False, True])
    assert seen == {"named": [True, False, True], "kwargs": [True, False, True]}
    torch.testing.assert_close(out.total, torch.ones(3))


def test_truncated_is_optional_and_checked():
    seen = {}

    def kwargs(prompts, completions, **kw):
        seen.update(kw)
        return [0.0] * len(completions)

    score([("k", kwargs)], None, PROMPTS, COMPLETIONS, {})
    assert "truncated" not in seen
    with pytest.raises(ValueError, match="2 truncated flags for 3"):
        score([("k", kwargs)], None, PROMPTS, COMPLETIONS, {}, truncated=[True, False])
    with pytest.raises(ValueError, match="'truncated' clashes"):
        score([("k", kwargs)], None, PROMPTS, COMPLETIONS, {"truncated": [1, 2, 3]})


def test_builtin_correctness_zero_when_truncated():
    out = score([("addition_correct", addition_correct)], None, PROMPTS, ["85", "85", "85"],
                {"answer": ["85"] * 3}, truncated=[False, True, False])
    torch.testing.assert_close(out.total, torch.tensor([1.0, 0.0, 1.0]))


# ---------------------------------------------------------------- RewardModel


@pytest.fixture(scope="module")
def tiny_rm_path(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForSequenceClassification,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    words = ["[PAD]", "[UNK]", "what", "is", "2", "+", "3", "?", "5", "6", "no"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("tiny_rm")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reward_model_batches_match_single_scoring(tiny_rm_path):
    rm = RewardModel.from_pretrained(tiny_rm_path, batch_size=2)
    prompts = ["what is 2 + 3 ? "] * 3
    completions = ["5", "6 6 6 no", "no"]
    batched = rm(prompts, completions)
    single = [rm([p], [c])[0] for p, c in zip(prompts, completions, strict=True)]
    assert len(batched) == 3 and all(isinstance(s, float) for s in batched)
    assert batched == pytest.approx(single, abs=1e-5)


def test_rm_spec_resolves_and_scores(tiny_rm_path):
    [(name, rm)] = resolve_reward_funcs([f"rm:{tiny_rm_path}"])
    assert name == f"rm:{tiny_rm_path}" and isinstance(rm, RewardModel)
    out = score([(name, rm)], None, ["what is 2 + 3 ? "] * 2, ["5", "no"], {"answer": ["5", "5"]})
    assert out.per_func.shape == (2, 1)


def test_a_model_id_or_a_loaded_model_is_a_reward_model_as_trl_takes_them(tiny_rm_path):
    from transformers import AutoModelForSequenceClassification

    [(name, by_path)] = resolve_reward_funcs(tiny_rm_path)  # a folder, as TRL's model ids
    [(loaded_name, loaded)] = resolve_reward_funcs(AutoModelForSequenceClassification.from_pretrained(tiny_rm_path))
    assert name == loaded_name == f"rm:{tiny_rm_path}" and isinstance(loaded, RewardModel)
    chat = [[{"role": "user", "content": "what is 2 + 3 ?"}]] * 2
    as_text = by_path(chat, ["5", "no"])
    assert loaded(chat, reward_completions(chat, ["5", "no"])) == pytest.approx(as_text, abs=1e-5)


def test_rec_rewards_through_score_get_the_columns_and_the_truncated_flags():
    funcs = resolve_reward_funcs(["rec_iou", "rec_format"])
    right = "<think>left</think><answer>[0, 0, 10, 10]</answer>"
    replies = [right, right, "<answer>[5, 0, 15, 10]</answer>"]
    out = score(funcs, [1.0, 0.5], ["p"] * 3, replies,
                {"solution": [[0, 0, 10, 10], [0, 0, 10, 10], "<answer>[0, 0, 10, 10]</answer>"],
                 "image": ["a.png", "b.png", "c.png"]},
                truncated=[False, True, False])
    assert out.per_func.tolist() == [[1.0, 1.0], [0.0, 0.0], [pytest.approx(1 / 3), 0.0]]
    assert out.total.tolist() == [1.5, 0.0, pytest.approx(1 / 3)]


# ---------------------------------------------------------------- TRL's call (issue 23)


def reward_num_unique_chars(completions, **kwargs):  # seed 000's reward function, as the write-up has it
    return [len(set(c)) for c in completions]


def test_one_callable_or_one_name_is_a_list_of_one():
    """TRL takes ``reward_funcs=f``; vroll iterated it ("'function' object is not iterable")."""
    assert resolve_reward_funcs(reward_num_unique_chars) == [("reward_num_unique_chars", reward_num_unique_chars)]
    assert resolve_reward_funcs("addition_correct") == [("addition_correct", addition_correct)]
    with pytest.raises(TypeError, match="reward_funcs takes a reward function or a list of them, got int"):
        resolve_reward_funcs(3)


def test_reward_functions_are_called_by_keyword_with_trls_names():
    """TRL's call: prompts=, completions=, completion_ids=, every column, trainer_state=; vroll called
    ``f(prompts, completions, ...)``, which a TRL function such as ``f(completions, **kwargs)`` refuses."""
    seen = {}

    def everything(completions, prompts, **kwargs):
        seen.update(kwargs, prompts=prompts)
        return [0.0] * len(completions)

    state = object()
    out = score([("unique", reward_num_unique_chars), ("all", everything)], None, PROMPTS, COMPLETIONS,
                {"answer": ["x", "y", "z"]}, truncated=[False, True, False], completion_ids=[[1], [2, 3], [4]],
                trainer_state=state)
    torch.testing.assert_close(out.per_func[:, 0], torch.tensor([1.0, 1.0, 1.0]))
    assert seen == {"prompts": PROMPTS, "answer": ["x", "y", "z"], "truncated": [False, True, False],
                    "completion_ids": [[1], [2, 3], [4]], "trainer_state": state}


def test_functions_written_for_the_positional_call_keep_working():
    """``def f(p, c, **kw)`` cannot take TRL's keywords: it is called positionally, as before, and named for the
    trainer's one warning line; a function with fixed parameters gets no argument it cannot take."""
    def positional(p, c, **kw):
        return [float(len(x)) for x in c]

    def fixed(prompts, completions, answer):
        return [1.0] * len(completions)

    funcs = [("positional", positional), ("lambda", lambda p, c, **k: [2.0] * len(c)), ("fixed", fixed),
             ("trl", reward_num_unique_chars)]
    out = score(funcs, None, PROMPTS, COMPLETIONS, {"answer": ["x"] * 3}, truncated=[False] * 3,
                completion_ids=[[1]] * 3, trainer_state=object())
    assert out.per_func.tolist() == [[1.0, 2.0, 1.0, 1.0], [2.0, 2.0, 1.0, 1.0], [3.0, 2.0, 1.0, 1.0]]
    assert positional_reward_funcs(funcs, ["answer"]) == ["positional", "lambda"]


def test_a_column_may_not_take_a_call_argument_name():
    with pytest.raises(ValueError, match="'completion_ids' clashes"):
        score([("length", length)], None, PROMPTS, COMPLETIONS, {"completion_ids": [1, 2, 3]})


def test_conversational_completions_are_messages_and_builtins_take_both_forms():
    chat = [[{"role": "user", "content": "What is 40 + 45?"}]] * 3
    replies = ["85", "The sum is 85.", "xyz"]
    messages = reward_completions(chat, replies)
    assert messages[1] == [{"role": "assistant", "content": "The sum is 85."}]
    assert reward_completions(PROMPTS, COMPLETIONS) == COMPLETIONS  # text prompts: texts
    assert [completion_text(m) for m in messages] == replies
    for name, columns in (("addition_correct", {"answer": ["85"] * 3}), ("addition_format", {}),
                          ("vowel_share", {}), ("rec_format", {})):
        [(_, func)] = resolve_reward_funcs(name)
        as_text = score([(name, func)], None, chat, replies, columns).total
        torch.testing.assert_close(score([(name, func)], None, chat, messages, columns).total, as_text)
    assert score(resolve_reward_funcs("addition_correct"), None, chat, messages,
                 {"answer": ["85"] * 3}).total.tolist() == [1.0, 1.0, 0.0]


def test_a_model_id_that_does_not_load_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"missing-model' is no built-in \(addition_correct.*loading it as a reward"):
        resolve_reward_funcs(str(tmp_path / "missing-model"))
