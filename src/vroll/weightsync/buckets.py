"""Packing tensors into flat, dtype-homogeneous buckets and back.

One bucket is one contiguous 1-D tensor of a single dtype: one broadcast moves it,
whatever the number of tensors inside. The plan (which tensor goes in which bucket,
at which offset) is computed from names, dtypes and shapes alone, so both sides agree
on it before any byte moves and the trainer can gather each bucket's parameters
(ZeRO-3, FSDP2) just before sending it. The plan's types, ``Bucket`` and ``TensorMeta``, are
the wire contract and live in ``vroll.protocol``; this module moves tensors in and out of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from vroll.protocol import DTYPE_SIZES, Bucket, TensorMeta

# The wire names (``vroll.protocol.DTYPE_SIZES``, torch-free) as torch dtypes.
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
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPE_SIZES)}") from None


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


def packed_chunks(metas: Sequence[TensorMeta], buffer_bytes: int) -> list[list[TensorMeta]]:
    """vLLM's packed broadcast, split as its producer splits it (``packed_tensor.pack_tensors``).

    The sender appends tensors (each in its own dtype, as raw bytes) to one uint8 buffer and
    broadcasts the buffer as soon as its size *exceeds* ``buffer_bytes``, then the rest at the end;
    the receiver learns only the tensor list, so it must cut at the same points.
    """
    if buffer_bytes <= 0:
        raise ValueError(f"packed buffer size must be positive, got {buffer_bytes} bytes")
    chunks: list[list[TensorMeta]] = [[]]
    size = 0
    for meta in metas:
        chunks[-1].append(meta)
        size += meta.nbytes
        if size > buffer_bytes:
            chunks.append([])
            size = 0
    return [c for c in chunks if c]


def unpack_bytes(chunk: Sequence[TensorMeta], flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of a packed uint8 buffer as the chunk's tensors, each in its own dtype (a copy only where
    mixed dtypes leave a tensor at an offset its element size does not divide: torch cannot view that)."""
    offset = 0
    for meta in chunk:
        dtype = to_dtype(meta.dtype)
        raw = flat[offset : offset + meta.nbytes]
        if offset % dtype.itemsize:
            raw = raw.clone()
        yield meta.name, raw.view(dtype).view(meta.shape)
        offset += meta.nbytes
