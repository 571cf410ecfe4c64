"""The rewards a run gets when it names none (vroll.tasks.default_reward_funcs)."""

import sys

import pytest

from vroll.tasks import default_reward_funcs
from vroll.tasks.addition import addition_rows
from vroll.tasks.rec import synthetic_rec_rows


def test_addition_data_gets_the_addition_rewards():
    assert default_reward_funcs("addition", []) == ["addition_correct", "addition_format"]
    rows = addition_rows("train", 3)  # a user's file in the addition layout (an answer column)
    assert default_reward_funcs("my.jsonl", rows) == ["addition_correct", "addition_format"]


def test_rec_rows_get_the_iou_and_format_rewards_as_grpo_rec_py():
    rows = [{**r, "image": "a.png"} for r in synthetic_rec_rows(2, seed=0)]
    assert default_reward_funcs("data_config/rec.yaml", rows) == ["rec_iou", "rec_format"]
    as_text = [{**rows[0], "solution": "<answer>[1, 2, 30, 40]</answer>"}]  # VLM-R1's own solution strings
    assert default_reward_funcs("rec.yaml", as_text) == ["rec_iou", "rec_format"]


@pytest.mark.parametrize("row", [
    {"prompt": "hi", "solution": [1, 2, 30, 40]},  # a box but no image: not REC
    {"prompt": "hi", "image": "a.png", "solution": "forty-two"},  # an image but no box
    {"prompt": "write a poem"},
])
def test_other_data_must_name_its_rewards(row):
    with pytest.raises(ValueError, match="--reward_funcs is required.*columns: "):
        default_reward_funcs("mine.jsonl", [row])


GUESS_TASK = '''
from vroll.environments import StepResult
from vroll.tasks import Task


def guess_rows(split, n):
    return [{"prompt": f"Guess {i}", "secret": str(i)} for i in range(n)]


def guess_correct(prompts, completions, secret, **kwargs):
    return [float(c.strip() == s) for c, s in zip(completions, secret)]


class GuessEnvironment:
    def __init__(self, row):
        self.secret = row["secret"]

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, reply):
        return StepResult([], done=True, reward=float(reply.strip() == self.secret))


TASK = Task("guess", rows=guess_rows, correct=guess_correct, rewards={"guess_correct": guess_correct},
            default_rewards=("guess_correct",), dataset=lambda size, seed: guess_rows("train", size),
            environment=GuessEnvironment, recognizes=lambda row: "secret" in row)
'''


def test_a_new_task_is_one_file(tmp_path, monkeypatch):
    """One module with a ``TASK`` is a task everywhere: eval's registry, the reward names, its dataset, its
    environment, the default rewards of its data (by name and by layout). With one registry per concern (the
    old tasks/rewards/environments/data lists) it took four edits."""
    import vroll.tasks
    from vroll.rewards import builtin_reward_funcs
    from vroll.tasks import builtin_environments, get_task, load_environment
    from vroll.trainer.data import load_rows

    (tmp_path / "guess.py").write_text(GUESS_TASK)
    monkeypatch.setattr(vroll.tasks, "__path__", [*vroll.tasks.__path__, str(tmp_path)])
    task = get_task("guess")
    assert task.correct([], ["3"], secret=["3"]) == [1.0]
    assert builtin_reward_funcs()["guess_correct"] is task.correct
    assert load_rows("guess", None, "train", 2, 0) == task.rows("train", 2)
    assert load_environment("guess") is builtin_environments()["guess"] is task.environment
    assert default_reward_funcs("guess", []) == ["guess_correct"]
    assert default_reward_funcs("mine.jsonl", [{"prompt": "p", "secret": "1"}]) == ["guess_correct"]
    monkeypatch.undo()
    sys.modules.pop("vroll.tasks.guess")
    with pytest.raises(ValueError, match="unknown task 'guess'"):
        get_task("guess")
