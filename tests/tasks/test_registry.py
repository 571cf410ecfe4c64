"""The rewards a run gets when it names none (vroll.tasks.default_reward_funcs)."""

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
