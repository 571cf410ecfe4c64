"""Packing tensors into flat, dtype-homogeneous buckets and back.

One bucket is one contiguous 1-D tensor of a single dtype: one broadcast moves it,
whatever the number of tensors inside. The plan (which tensor goes in which bucket,
at which offset) is computed from names, dtypes and shapes alone, so both sides agree
on it before any byte moves and the trainer can gather each bucket's parameters
(ZeRO-3, FSDP2) just before sending it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
    "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the wire spelling)."""
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    """The wire spelling back to a torch dtype, with a clear error."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}") from None


def is_floating(name: str) -> bool:
    """Whether a wire dtype name is a floating-point type (False for unknown names)."""
    dtype = DTYPES.get(name)
    return dtype is not None and dtype.is_floating_point


@dataclass(frozen=True)
class TensorMeta:
    """Name, wire dtype and full (unsharded, checkpoint) shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * to_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Bucket:
    """The tensors of one broadcast, in packing order, all of one dtype."""

    dtype: str
    tensors: tuple[TensorMeta, ...]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @classmethod
    def from_rpc(cls, value: Bucket | dict[str, Any]) -> Bucket:
        """A bucket as it arrives in a vLLM worker: vLLM's multiprocess RPC (msgpack, vLLM 0.22 on
        GPU) turns dataclasses into dicts on the way, the in-process one keeps them."""
        if isinstance(value, Bucket):
            return value
        tensors = tuple(t if isinstance(t, TensorMeta) else TensorMeta(t["name"], t["dtype"], tuple(t["shape"]))
                        for t in value["tensors"])
        return cls(value["dtype"], tensors)

    @property
    def nbytes(self) -> int:
        return self.numel * to_dtype(self.dtype).itemsize


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Group tensors into dtype-homogeneous buckets of at most ``bucket_bytes``.

    Tensors keep their model order inside each dtype (so a layer's weights travel
    together, which keeps per-bucket gathers local); a tensor larger than the bucket
    size gets a bucket of its own rather than being split.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    open_: dict[str, list[TensorMeta]] = {}
    sizes: dict[str, int] = {}
    out: list[Bucket] = []
    for meta in metas:
        cur = open_.setdefault(meta.dtype, [])
        if cur and sizes[meta.dtype] + meta.nbytes > bucket_bytes:
            out.append(Bucket(meta.dtype, tuple(cur)))
            cur.clear()
            sizes[meta.dtype] = 0
        cur.append(meta)
        sizes[meta.dtype] = sizes.get(meta.dtype, 0) + meta.nbytes
    out.extend(Bucket(d, tuple(ts)) for d, ts in open_.items() if ts)
    return out


def pack(bucket: Bucket, tensors: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Copy the bucket's tensors into one flat buffer on ``device``."""
    flat = torch.empty(bucket.numel, dtype=to_dtype(bucket.dtype), device=device)
    offset = 0
    for meta in bucket.tensors:
        src = tensors[meta.name]
        if tuple(src.shape) != meta.shape:
            raise ValueError(f"{meta.name}: planned shape {meta.shape}, got {tuple(src.shape)}")
        flat[offset : offset + meta.numel].copy_(src.reshape(-1), non_blocking=True)
        offset += meta.numel
    return flat


def unpack(bucket: Bucket, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of ``flat`` shaped as the bucket's tensors (no copies)."""
    offset = 0
    for meta in bucket.tensors:
        yield meta.name, flat[offset : offset + meta.numel].view(meta.shape)
        offset += meta.numel
