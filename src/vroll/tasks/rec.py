"""Referring expression comprehension (REC): find the box of the object a phrase names.

The task of VLM-R1's ``grpo_rec.py``: a row is an ``image``, a ``problem`` (the phrase, e.g.
"the red circle") and a ``solution`` (its box ``[x1, y1, x2, y2]`` in the image's pixels);
the prompt asks for the reasoning in ``<think>`` tags and the box in ``<answer>`` tags.

Scoring is strict, like the addition task's: a reply scores only if its final answer is one
box and nothing follows it, and a reply cut at the length limit (no EOS) scores 0:

- ``rec_iou``: the IoU of the answered box with the solution (0 if there is no answer);
- ``rec_format``: 1 for ``<think>...</think><answer>BOX</answer>`` and nothing after, else 0;
- ``rec_correct`` (``vroll eval --task rec``): 1 if that IoU is at least 0.5 (REC's Acc@0.5).

A box is ``[x1, y1, x2, y2]`` (a bare list, or JSON such as ``{"bbox_2d": [...]}`` or
Qwen2.5-VL's ``[{"bbox_2d": [...], "label": ...}]``, in a code fence or not).

:func:`make_synthetic_rec` writes a small synthetic dataset (coloured shapes at known boxes)
in VLM-R1's layout: PNG images, a JSONL file and a YAML list for ``--dataset_name``.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

from vroll.rows import IMAGE_COLUMNS, completion_text
from vroll.tasks import Task

QUESTION_TEMPLATE = ("{Question} First output the thinking process in <think> </think> tags and then output the "
                     "final answer in <answer> </answer> tags. Output the final answer as a bounding box "
                     "[x1, y1, x2, y2] in the image's pixels.")
IOU_THRESHOLD = 0.5  # REC accuracy: a box counts as found at IoU >= 0.5

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"^\s*<think>.*?</think>\s*<answer>(?P<box>.*?)</answer>\s*$", re.DOTALL)
_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_BOX_KEYS = ("bbox_2d", "bbox", "box")


def rec_prompt(problem: str, num_images: int = 1) -> list[dict[str, Any]]:
    """The chat prompt of one REC row: its image part(s), then the question template."""
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION_TEMPLATE.format(Question=problem)}]}]


# ---------------------------------------------------------------------------- parsing


def parse_box(text: str) -> list[float] | None:
    """A box ``[x1, y1, x2, y2]`` (x2 > x1, y2 > y1, finite) from a box's text, or None."""
    text = text.strip()
    fenced = _FENCE_RE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return _as_box(value)


def _as_box(value: Any) -> list[float] | None:
    if isinstance(value, dict):
        key = next((k for k in _BOX_KEYS if k in value), None)
        return None if key is None else _as_box(value[key])
    if not isinstance(value, list):
        return None
    if len(value) == 1 and isinstance(value[0], list | dict):  # [{"bbox_2d": ...}] or [[x1, y1, x2, y2]]
        return _as_box(value[0])
    if len(value) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return None
    box = [float(v) for v in value]
    if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box


def extract_box(reply: str) -> list[float] | None:
    """The reply's final answer box if the reply ends with exactly one answer, else None.

    With tags: one ``<answer>BOX</answer>``, nothing but whitespace after it (text before it,
    the reasoning, is free). Without tags: the whole reply must be the box.
    """
    answers = _ANSWER_RE.findall(reply)
    if not answers:
        return None if "<answer>" in reply else parse_box(reply)
    if len(answers) != 1 or reply[reply.rindex("</answer>") + len("</answer>"):].strip():
        return None
    return parse_box(answers[0])


def solution_box(solution: Any) -> list[float]:
    """The ground-truth box of a ``solution`` value: a list, or text (``<answer>[...]</answer>``, JSON)."""
    if isinstance(solution, str):
        box = extract_box(solution)
    else:
        box = _as_box(list(solution) if isinstance(solution, tuple) else solution)
    if box is None:
        raise ValueError(f"solution {solution!r} is not a box [x1, y1, x2, y2] with x2 > x1 and y2 > y1")
    return box


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ---------------------------------------------------------------------------- rewards


def _cut(truncated: list[bool] | None, n: int) -> list[bool]:
    return list(truncated) if truncated is not None else [False] * n


def rec_iou(prompts: list[Any], completions: list[Any], solution: list[Any],
            truncated: list[bool] | None = None, **kwargs: Any) -> list[float]:
    """IoU of the reply's (a text, or TRL's message form) answered box with ``solution``; 0 without a strict
    answer or if ``truncated``."""
    out = []
    cut = _cut(truncated, len(completions))
    for reply, sol, was_cut in zip(map(completion_text, completions), solution, cut, strict=True):
        box = None if was_cut else extract_box(reply)
        out.append(0.0 if box is None else iou(box, solution_box(sol)))
    return out


def rec_format(prompts: list[Any], completions: list[Any], truncated: list[bool] | None = None,
               **kwargs: Any) -> list[float]:
    """1.0 for ``<think>...</think><answer>BOX</answer>`` with nothing after it, else 0.0 (0.0 if ``truncated``)."""
    out = []
    for reply, was_cut in zip(map(completion_text, completions), _cut(truncated, len(completions)), strict=True):
        m = None if was_cut else _FORMAT_RE.match(reply)
        out.append(1.0 if m and reply.count("<answer>") == 1 and parse_box(m["box"]) is not None else 0.0)
    return out


def rec_correct(prompts: list[Any], completions: list[Any], solution: list[Any],
                truncated: list[bool] | None = None, **kwargs: Any) -> list[float]:
    """1.0 if the answered box overlaps the solution with IoU >= 0.5 (REC's Acc@0.5), else 0.0."""
    return [float(v >= IOU_THRESHOLD) for v in rec_iou(prompts, completions, solution, truncated)]


# ---------------------------------------------------------------------------- synthetic data

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 20),
          "purple": (140, 50, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 240)


def _place(rng: random.Random, size: int, taken: list[list[int]]) -> list[int] | None:
    """A free box ``[x1, y1, x2, y2]`` (ints) that overlaps none in ``taken``, or None."""
    lo, hi = max(8, size // 6), max(9, size // 3)
    for _ in range(50):
        w = rng.randint(lo, hi)
        x, y = rng.randint(0, size - w), rng.randint(0, size - w)
        box = [x, y, x + w, y + w]
        if all(iou(box, t) == 0.0 and not _touch(box, t) for t in taken):
            return box
    return None


def _touch(a: list[int], b: list[int]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _draw(draw: Any, shape: str, box: list[int], color: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=color)
    elif shape == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=color)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=color)


def synthetic_rec_rows(n: int, seed: int, size: int = 112, objects: int = 3) -> list[dict[str, Any]]:
    """``n`` REC rows with in-memory PIL images: ``objects`` coloured shapes at distinct boxes, the
    ``problem`` naming one of them ("the red circle") and the ``solution`` its box (pixels)."""
    from PIL import Image, ImageDraw

    if n < 1 or size < 28 or objects < 1:
        raise ValueError(f"need n >= 1, size >= 28 and objects >= 1; got n={n}, size={size}, objects={objects}")
    rng = random.Random(seed)
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    rows = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        placed: list[tuple[str, str, list[int]]] = []
        for color, shape in rng.sample(kinds, objects):
            box = _place(rng, size, [b for _, _, b in placed])
            if box is not None:
                _draw(draw, shape, box, COLORS[color])
                placed.append((color, shape, box))
        color, shape, box = rng.choice(placed)
        rows.append({"image": image, "problem": f"the {color} {shape}", "solution": box})
    return rows


def make_synthetic_rec(out_dir: str | Path, n: int, seed: int = 0, size: int = 112) -> Path:
    """Write ``n`` synthetic REC rows in VLM-R1's layout; returns the YAML list for ``--dataset_name``.

    ``out_dir/images/rec_00000.png ...``, ``out_dir/rec.jsonl`` (``image`` relative to ``out_dir``,
    which is the ``--image_root``) and ``out_dir/rec.yaml`` (``datasets: [{json_path: rec.jsonl}]``).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(synthetic_rec_rows(n, seed, size)):
        name = f"images/rec_{i:05d}.png"
        row["image"].save(out / name)
        lines.append(json.dumps({"image": name, "problem": row["problem"], "solution": row["solution"]}))
    (out / "rec.jsonl").write_text("\n".join(lines) + "\n")
    yaml_path = out / "rec.yaml"
    yaml_path.write_text("# VLM-R1 grpo_rec.py format; images are relative to --image_root "
                         f"{out}\ndatasets:\n  - json_path: rec.jsonl\n")
    return yaml_path


SPLIT_SEEDS = {"train": 0, "test": 1}
EVAL_SIZE = 112


def rec_rows(split: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` synthetic REC rows of ``split`` (``vroll eval --task rec``), prompted."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows = synthetic_rec_rows(n, SPLIT_SEEDS[split], EVAL_SIZE)
    return [{**r, "prompt": rec_prompt(r["problem"])} for r in rows]


def rec_layout(row: dict[str, Any]) -> bool:
    """Whether a row of other data is in VLM-R1's REC layout: images and a box ``solution``."""
    if "solution" not in row or not any(k in row for k in IMAGE_COLUMNS):
        return False
    try:
        solution_box(row["solution"])
    except ValueError:
        return False
    return True


TASK = Task("rec", rows=rec_rows, correct=rec_correct, rewards={"rec_iou": rec_iou, "rec_format": rec_format},
            default_rewards=("rec_iou", "rec_format"), recognizes=rec_layout, takes_images=True,
            answer_column="solution")
