"""Image datasets for the trainer: image columns, chat image parts, VLM-R1's YAML lists, missing files."""

import io
import json

import pytest
from PIL import Image

from vroll.rows import images_of, prompt_of, with_image_parts
from vroll.tasks.rec import QUESTION_TEMPLATE, make_synthetic_rec
from vroll.trainer.data import load_rows, prepare_rows


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    make_synthetic_rec(root, n=6, seed=0, size=56)
    return root


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), color).save(buf, format="PNG")
    return buf.getvalue()


def test_yaml_list_rows_are_prompted_like_grpo_rec(rec_dir):
    rows = prepare_rows(load_rows(str(rec_dir / "rec.yaml"), None, "train", 0, 0), "rec", str(rec_dir))
    assert len(rows) == 6
    row = rows[0]
    assert row["image"] == str((rec_dir / "images" / "rec_00000.png").resolve())  # resolved against image_root
    assert row["prompt"] == [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTION_TEMPLATE.format(Question=row["problem"])}]}]
    (img,) = images_of(row)
    assert img.mode == "RGB" and img.size == (56, 56)


def test_yaml_sampling_strategies_and_semicolon_lists(rec_dir, tmp_path):
    spec = tmp_path / "mix.yaml"
    jsonl = rec_dir / "rec.jsonl"
    spec.write_text(f"datasets:\n  - json_path: {jsonl}\n    sampling_strategy: first:2\n"
                    f"  - json_path: {jsonl}\n    sampling_strategy: end:50%\n"
                    f"  - json_path: {jsonl}\n    sampling_strategy: random:1\n")
    rows = load_rows(str(spec), None, "train", 0, seed=0)
    problems = [json.loads(x)["problem"] for x in jsonl.read_text().splitlines()]
    assert [r["problem"] for r in rows[:5]] == problems[:2] + problems[3:]
    assert len(rows) == 6 and rows[5]["problem"] in problems
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps([json.loads(x) for x in jsonl.read_text().splitlines()][:2]))
    both = load_rows(f"{jsonl};{as_json}", None, "train", 0, 0)
    assert len(both) == 8 and all("prompt" in r for r in both)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"datasets:\n  - json_path: {jsonl}\n    sampling_strategy: some:3\n")
    with pytest.raises(ValueError, match="sampling_strategy must be"):
        load_rows(str(bad), None, "train", 0, 0)
    bad.write_text("train: [a.json]\n")
    with pytest.raises(ValueError, match="VLM-R1's format"):
        load_rows(str(bad), None, "train", 0, 0)


def test_missing_image_is_named_with_its_row_before_training(rec_dir, tmp_path):
    rows = [json.loads(x) for x in (rec_dir / "rec.jsonl").read_text().splitlines()]
    rows[3]["image"] = "images/gone.png"
    data = tmp_path / "rec.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = load_rows(f"{data};", None, "train", 0, 0)
    with pytest.raises(ValueError, match=r"row 3: image file .*images/gone.png does not exist \(image_root: "):
        prepare_rows(loaded, "rec", str(rec_dir))
    with pytest.raises(ValueError, match=r"row 0: image file images/rec_00000.png does not exist \(no --image_root"):
        prepare_rows(load_rows(f"{data};", None, "train", 0, 0), "rec", None)


def test_image_columns_take_pil_bytes_dicts_and_paths(rec_dir):
    path = str(rec_dir / "images" / "rec_00001.png")
    rows = [
        {"prompt": [{"role": "user", "content": "what is red?"}], "image": Image.new("L", (28, 28))},
        {"prompt": [{"role": "user", "content": "compare"}], "images": [_png("blue"), {"bytes": _png("red")}, path]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]},
                      {"role": "assistant", "content": "b"}], "images": [{"path": path, "bytes": None}]},
        {"problem": "the red circle", "image": path},
        {"problem": "no image at all"},
    ]
    rows = prepare_rows(rows, "mixed", None)
    images = [images_of(r) for r in rows]
    assert [len(i) for i in images] == [1, 3, 1, 1, 0]
    assert all(im.mode == "RGB" for i in images for im in i)
    assert images[1][0].getpixel((0, 0)) == (0, 0, 255) and images[1][1].getpixel((0, 0)) == (255, 0, 0)
    # image parts: added at the start of the first user turn, or the prompt's own kept in place
    assert prompt_of(rows[0]) == [{"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": "what is red?"}]}]
    assert [p["type"] for p in prompt_of(rows[1])[0]["content"]] == ["image", "image", "image", "text"]
    assert prompt_of(rows[2]) == [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]
    assert prompt_of(rows[3])[0]["content"][0] == {"type": "image"}
    assert prompt_of(rows[4]) == [{"role": "user", "content": "no image at all"}]


def test_image_parts_must_match_the_images():
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image", "image": "x.png"}, {"type": "text",
                                                                                              "text": "q"}]}]
    assert with_image_parts(two, 2)[0]["content"][1] == {"type": "image"}  # payloads dropped: the column has them
    with pytest.raises(ValueError, match="2 image part"):
        with_image_parts(two, 1)
    with pytest.raises(ValueError, match="chat messages"):
        with_image_parts("a plain text prompt", 1)
    with pytest.raises(ValueError, match="row 0: the prompt has 2 image part"):
        prepare_rows([{"prompt": two, "image": Image.new("RGB", (28, 28))}], "d", None)
