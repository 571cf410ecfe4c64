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


class BucketBuffers:
    """Flat buffers kept from one sync to the next, one per bucket index, each grown to the largest
    bucket it has held.

    A fresh 0.27 GB CPU buffer costs more to fill than the copy itself: the allocator hands such
    blocks back to the OS on free, so every sync page-faulted its whole payload in again (packing
    SmolLM2-135M: 0.47 s into a new buffer, 0.08 s into a kept one, one core). On CPU ``pin`` makes
    them page-locked, the target of an asynchronous copy from a GPU (and the GPU's source for a copy
    the other way).

    Args:
        device: where the buffers live.
        pin: page-locked host memory (only on CPU, only where CUDA is there).
    """

    def __init__(self, device: torch.device, pin: bool = False) -> None:
        self.device = device
        self.pin = pin and device.type == "cpu" and torch.cuda.is_available()
        self._raw: list[torch.Tensor] = []

    def get(self, index: int, bucket: Bucket) -> torch.Tensor:
        """The buffer for bucket ``index`` as a flat tensor of the bucket's dtype and size: (numel,).

        Its contents are whatever it held last; a buffer already handed out for the same ``index``
        is reused (the caller is done with it).
        """
        while len(self._raw) <= index:
            self._raw.append(torch.empty(0, dtype=torch.uint8, device=self.device))
        nbytes = bucket.nbytes
        if self._raw[index].numel() < nbytes:
            self._raw[index] = torch.empty(0, dtype=torch.uint8, device=self.device)  # free the old one first
            self._raw[index] = torch.empty(nbytes, dtype=torch.uint8, device=self.device, pin_memory=self.pin)
        return self._raw[index][:nbytes].view(to_dtype(bucket.dtype))

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` shares memory with one of these buffers."""
        ptr = tensor.untyped_storage().data_ptr()
        return any(raw.untyped_storage().data_ptr() == ptr for raw in self._raw if raw.numel())

    @property
    def nbytes(self) -> int:
        return sum(raw.numel() for raw in self._raw)


def pack(bucket: Bucket, tensors: dict[str, torch.Tensor], device: torch.device,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy the bucket's tensors into one flat buffer on ``device``: (numel,) of the bucket's dtype.

    Each tensor is cast while it is copied (one pass; ``copy_`` converts). ``out``: the buffer to
    fill (from :class:`BucketBuffers`), else a new one. Returns once the buffer can be read on the
    host when it is on CPU (a copy from a GPU into pinned memory is asynchronous until then).
    """
    flat = torch.empty(bucket.numel, dtype=to_dtype(bucket.dtype), device=device) if out is None else out
    if flat.numel() != bucket.numel or flat.dtype != to_dtype(bucket.dtype):
        raise ValueError(f"pack: buffer of {flat.numel()} {flat.dtype} for a bucket of {bucket.numel} {bucket.dtype}")
    offset = 0
    from_gpu = False
    for meta in bucket.tensors:
        src = tensors[meta.name]
        if tuple(src.shape) != meta.shape:
            raise ValueError(f"{meta.name}: planned shape {meta.shape}, got {tuple(src.shape)}")
        flat[offset : offset + meta.numel].view(meta.shape).copy_(src, non_blocking=True)
        from_gpu |= src.is_cuda
        offset += meta.numel
    if from_gpu and flat.device.type == "cpu":
        torch.cuda.synchronize()
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
