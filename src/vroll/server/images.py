"""Images of a request: base64 (bare or a data URL) decoded to RGB PIL images, with a pixel cap.

Decoding is CPU work: the routes run :func:`decode_prompt_images` in a thread. The pixel
count is read from the image header before any pixel is decoded, so an oversized image (or a
decompression bomb) costs nothing. The server fetches nothing: ``http(s)://`` URLs are refused.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from vroll.server.errors import ApiError

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # 16.8M pixels (64 MiB as RGB); Qwen2-VL resizes to <= 12.8M anyway


def decode_image(data: str, max_pixels: int, where: str) -> Any:
    """One image as an RGB ``PIL.Image``; ``ApiError`` 400 (not an image) or 413 (over ``max_pixels``)."""
    from PIL import Image, UnidentifiedImageError

    raw = _base64_bytes(data, where)
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise ApiError(413, f"{where} is over the image size cap of {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ApiError(400, f"{where} cannot be decoded as an image (not a format PIL reads)") from None
    except (OSError, ValueError) as exc:
        raise ApiError(400, f"{where} cannot be decoded as an image ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(413, f"{where} is {width}x{height} = {width * height} pixels, over the image size cap "
                            f"of {max_pixels} pixels (--max-image-pixels)")
    try:  # RGB as transformers' processors make it (the trainer's pixels); decodes, so a truncated file fails
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, f"{where} cannot be decoded as an image ({type(exc).__name__}: {exc})") from None


def _base64_bytes(data: str, where: str) -> bytes:
    if data.startswith(("http://", "https://")):
        raise ApiError(400, f"{where} is a URL; the server fetches nothing: send the image as base64 "
                            "(or a data:image/...;base64, URL)")
    if data.startswith("data:"):
        header, sep, payload = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiError(400, f"{where} is a data URL without ';base64,': send base64-encoded image bytes")
        data = payload
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{where} is not valid base64 ({exc})") from None


def decode_prompt_images(images: list[list[str]], max_pixels: int) -> list[tuple[Any, ...]]:
    """Every prompt's images, decoded; errors name the prompt (and the image when it has several)."""
    out = []
    for i, prompt_images in enumerate(images):
        out.append(tuple(
            decode_image(data, max_pixels, f"prompt {i} image {j}" if len(prompt_images) > 1 else f"prompt {i} image")
            for j, data in enumerate(prompt_images)))
    return out
