"""The REC task by hand: box parsing, IoU, strict scoring, the synthetic data and its VLM-R1 layout."""

import json

import pytest
import yaml

from vroll.tasks import get_task
from vroll.tasks.rec import (
    extract_box,
    iou,
    make_synthetic_rec,
    parse_box,
    rec_correct,
    rec_format,
    rec_iou,
    rec_prompt,
    rec_rows,
    solution_box,
    synthetic_rec_rows,
)

BOX = [10, 20, 50, 60]


@pytest.mark.parametrize("reply", [
    "<think>it is on the left</think><answer>[10, 20, 50, 60]</answer>",
    "<think>x</think>\n<answer>\n[10,20,50,60]\n</answer>\n",
    "<answer>{\"bbox_2d\": [10, 20, 50, 60]}</answer>",
    "<answer>[{\"bbox_2d\": [10, 20, 50, 60], \"label\": \"red circle\"}]</answer>",
    "<answer>```json\n[{\"bbox_2d\": [10, 20, 50, 60]}]\n```</answer>",
    "[10, 20, 50, 60]",
    " [10.0, 20.0, 50.0, 60.0] ",
    "{\"bbox\": [10, 20, 50, 60]}",
    "```json\n{\"bbox_2d\": [10, 20, 50, 60]}\n```",
    "[[10, 20, 50, 60]]",
])
def test_accepted_answers(reply):
    assert extract_box(reply) == BOX


@pytest.mark.parametrize("reply", [
    "<answer>[10, 20, 50, 60]</answer> and then more text",  # the answer is not the final word
    "<answer>[10, 20, 50, 60]</answer><answer>[0, 0, 5, 5]</answer>",  # two answers
    "<answer>[10, 20, 50, 60]",  # never closed (what a truncated reply looks like)
    "The box is [10, 20, 50, 60].",  # a bare box must be the whole reply
    "<answer>[10, 20, 50]</answer>",  # three numbers
    "<answer>[50, 20, 10, 60]</answer>",  # x2 < x1
    "<answer>[10, 20, 50, 60], [1, 2, 3, 4]</answer>",  # two boxes
    "<answer>[[10, 20, 50, 60], [1, 2, 3, 4]]</answer>",
    "<answer>[true, 20, 50, 60]</answer>",
    "<answer>{\"label\": \"red\"}</answer>",
    "",
])
def test_rejected_answers(reply):
    assert extract_box(reply) is None


def test_iou_by_hand():
    assert iou(BOX, BOX) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0  # touching corners
    assert iou([0, 0, 10, 10], [2, 2, 4, 4]) == pytest.approx(4 / 100)


def test_solution_forms():
    assert solution_box([10, 20, 50, 60]) == BOX
    assert solution_box("<answer>[10, 20, 50, 60]</answer>") == BOX  # VLM-R1's processed jsons
    assert solution_box("[10, 20, 50, 60]") == BOX
    with pytest.raises(ValueError, match="not a box"):
        solution_box([1, 2, 3])


def test_rewards_are_strict():
    replies = ["<think>a</think><answer>[10, 20, 50, 60]</answer>",  # exact, well formed
               "<answer>[0, 20, 40, 60]</answer>",  # no think: IoU counts, the format does not
               "<think>a</think><answer>[10, 20, 50, 60]</answer> extra",  # text after the answer
               "<think>a</think><answer>[10, 20, 50, 60]</answer>",  # right, but cut at the length limit
               "no idea"]
    sols = [BOX, BOX, BOX, BOX, BOX]
    cut = [False, False, False, True, False]
    ious = rec_iou([None] * 5, replies, sols, truncated=cut)
    assert ious[0] == 1.0 and ious[1] == pytest.approx(iou([0, 20, 40, 60], BOX)) and ious[2:] == [0.0, 0.0, 0.0]
    assert rec_format([None] * 5, replies, truncated=cut) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert rec_correct([None] * 5, replies, sols, truncated=cut) == [1.0, 1.0, 0.0, 0.0, 0.0]  # IoU 0.75 >= 0.5
    assert rec_iou([None], [replies[0]], [BOX]) == [1.0]  # no truncated flags: nothing was cut
    far = "<think>a</think><answer>[100, 100, 120, 120]</answer>"
    assert rec_correct([None], [far], [BOX]) == [0.0] and rec_format([None], [far]) == [1.0]


def test_parse_box_needs_json():
    assert parse_box("[1, 2, 3, 4]") == [1.0, 2.0, 3.0, 4.0]
    assert parse_box("(1, 2, 3, 4)") is None
    assert parse_box("[1, 2, 3, nan]") is None


def test_synthetic_rows_name_a_shape_at_its_box():
    rows = synthetic_rec_rows(20, seed=3, size=112)
    again = synthetic_rec_rows(20, seed=3, size=112)
    assert [r["solution"] for r in rows] == [r["solution"] for r in again]  # seeded
    for row in rows:
        x1, y1, x2, y2 = row["solution"]
        assert 0 <= x1 < x2 <= 112 and 0 <= y1 < y2 <= 112
        color, shape = row["problem"].split()[1:]
        # the named shape's colour fills the middle of its box (circle, square and triangle alike)
        middle = row["image"].getpixel(((x1 + x2) // 2, (y1 + 3 * y2) // 4))
        from vroll.tasks.rec import COLORS
        assert middle == COLORS[color], (row["problem"], middle)
        assert shape in ("circle", "square", "triangle")


def test_make_synthetic_rec_writes_vlm_r1_layout(tmp_path):
    yaml_path = make_synthetic_rec(tmp_path / "rec", n=5, seed=0, size=56)
    spec = yaml.safe_load(yaml_path.read_text())
    assert spec == {"datasets": [{"json_path": "rec.jsonl"}]}
    rows = [json.loads(x) for x in (tmp_path / "rec" / "rec.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]) == {"image", "problem", "solution"}
    assert all((tmp_path / "rec" / r["image"]).is_file() for r in rows)


def test_rec_is_a_builtin_task_with_its_rewards():
    from vroll.rewards import builtin_reward_funcs

    task = get_task("rec")
    rows = task.rows("test", 3)
    assert rows == rec_rows("test", 3) and rows[0]["prompt"] == rec_prompt(rows[0]["problem"])
    assert rows[0]["prompt"][0]["content"][0] == {"type": "image"}
    assert [r["problem"] for r in rows] != [r["problem"] for r in task.rows("train", 3)]
    assert task.answer_column == "solution"
    assert builtin_reward_funcs()["rec_iou"] is rec_iou and builtin_reward_funcs()["rec_format"] is rec_format
