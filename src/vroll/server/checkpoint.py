"""The served checkpoint's tensors (names, dtypes, shapes), read from safetensors headers.

The server checks a trainer's bucket plan against these before any byte moves.
Only the JSON headers are read (no tensor data), so this is cheap even for large models.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from vroll.protocol import TensorMeta

# safetensors dtype codes -> the wire spelling (``vroll.protocol.DTYPE_SIZES``)
SAFETENSORS_DTYPES = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
    "I8": "int8", "U8": "uint8", "I32": "int32", "I64": "int64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def _local_snapshot(model: str, revision: str | None) -> Path | None:
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True,
                                      allow_patterns=["*.safetensors", "*.json"]))
    except Exception:  # not in the local cache (or not a Hub model): nothing to read
        return None


def checkpoint_tensors(model: str, revision: str | None = None) -> dict[str, TensorMeta] | None:
    """Every tensor of a local safetensors checkpoint, by name; ``None`` when there is none.

    A dtype outside :data:`SAFETENSORS_DTYPES` keeps its lowercased code (``"i16"``):
    weight sync refuses to send such a tensor.
    """
    folder = _local_snapshot(model, revision)
    files = sorted(folder.glob("*.safetensors")) if folder else []
    if not files:
        return None
    out: dict[str, TensorMeta] = {}
    for file in files:
        with open(file, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                dtype = SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())
                out[name] = TensorMeta(name, dtype, tuple(entry["shape"]))
    return out
