"""Dataset rows: what a row's prompt and images are.

A dataset is a list of rows (dicts). A row's prompt is its ``prompt`` column (a text,
or a list of chat messages), else its ``messages`` column (the conversation up to its
last user turn), else its ``problem`` column (the text of one user turn). Every other
column is passed to reward functions by name (the addition task's ``answer``, REC's
``solution``, for instance).

Images: an ``image`` or ``images`` column holds a row's images (PIL images, bytes,
``{"bytes": ..., "path": ...}`` as Hugging Face datasets store them, or file paths), in the
order of the ``{"type": "image"}`` parts of the prompt's user turns; a prompt without such
parts gets them at the start of its first user turn (as TRL does).

The trainer loads and checks datasets (``vroll.trainer.data``); environments, tools, the
generation planner and ``vroll eval`` read rows through these functions.
"""

from __future__ import annotations

import io
from typing import Any

IMAGE_COLUMNS = ("image", "images")


def prompt_of(row: dict[str, Any]) -> str | list[dict[str, Any]]:
    """The prompt of one row: ``prompt``, ``messages`` up to the last user turn, or ``problem``.

    With images, the prompt's user turns hold one ``{"type": "image"}`` part per image.
    """
    if "prompt" in row:
        prompt = row["prompt"]
    elif "messages" in row:
        messages = row["messages"]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        prompt = messages[: last_user + 1]
    else:
        prompt = [{"role": "user", "content": row["problem"]}]
    n = len(image_values(row))
    return with_image_parts(prompt, n) if n else prompt


def with_image_parts(prompt: str | list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The chat prompt with ``n`` image parts: its own (payloads dropped), or ``n`` at the start of its
    first user turn when it has none."""
    if isinstance(prompt, str):
        raise ValueError("a text prompt cannot hold images: give the prompt as chat messages")
    have = sum(_is_image_part(p) for m in prompt for p in _parts(m))
    if have not in (0, n):
        raise ValueError(f"the prompt has {have} image part(s) for {n} image(s)")
    out = []
    for m in prompt:
        parts = [{"type": "image"} if _is_image_part(p) else p for p in _parts(m)]
        if have == 0 and m.get("role") == "user" and not any(o.get("role") == "user" for o in out):
            parts = [{"type": "image"} for _ in range(n)] + parts
        out.append({**m, "content": parts})
    return out


def _parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or [])


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def image_values(row: dict[str, Any]) -> list[Any]:
    """The row's image values (a single ``image`` becomes a list of one)."""
    for col in IMAGE_COLUMNS:
        value = row.get(col)
        if value is not None:
            return list(value) if isinstance(value, list | tuple) else [value]
    return []


def images_of(row: dict[str, Any]) -> tuple[Any, ...]:
    """The row's images as RGB PIL images, in placeholder order (paths were resolved by :func:`prepare_rows`)."""
    return tuple(open_image(v) for v in image_values(row))


def open_image(value: Any) -> Any:
    """A PIL image (RGB) from a PIL image, bytes, a ``{"bytes"|"path": ...}`` dict or a file path."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        return Image.open(io.BytesIO(value)).convert("RGB")
    with Image.open(value) as im:
        return im.convert("RGB")


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a completion in either form: a text, or (a conversational prompt's, TRL's form) the
    content of its last assistant message."""
    if isinstance(completion, str):
        return completion
    replies = [m for m in completion if m.get("role") == "assistant"] or list(completion)
    content = replies[-1].get("content") if replies else ""
    if isinstance(content, list):  # content parts: the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""
