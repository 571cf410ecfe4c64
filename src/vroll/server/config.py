"""``ServeConfig``: the flags of ``vroll serve`` (alias ``vroll vllm-serve``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from vroll.flags import check, field
from vroll.models import DEFAULT_MODEL, resolve_model
from vroll.protocol import EngineSpec
from vroll.server.images import DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class ServeConfig:
    model: str = field(DEFAULT_MODEL, help="model: 'smollm2-135m' (embedded), an HF id or a local folder")
    revision: str | None = field(None, help="model revision (branch, tag or commit) on the Hub")
    tensor_parallel_size: int = field(1, help="devices per replica (T)")
    data_parallel_size: int = field(1, help="independent replicas (D); uses D*T devices")
    host: str = field("127.0.0.1", help="address to bind; non-loopback needs --api-key")
    port: int = field(8000, help="HTTP port (0 picks a free one and prints it)")
    gpu_memory_utilization: float = field(0.9, help="fraction of each GPU vLLM may use")
    dtype: str = field("auto", help="weights/activations dtype: auto, bfloat16, float16, float32")
    max_model_len: int | None = field(None, help="context length (prompt + completion); default: the model's")
    enable_prefix_caching: bool | None = field(None, help="reuse KV cache across prompts sharing a prefix")
    enforce_eager: bool = field(False, help="skip torch.compile/CUDA graphs (faster start, slower decode)")
    seed: int = field(0, help="engine seed")
    api_key: str | None = field(None, help="require 'Authorization: Bearer KEY' (env VROLL_API_KEY)")
    log_level: str = field("info", help="debug, info, warning or error")
    kv_cache_memory_gib: float | None = field(
        None, help="KV cache per replica in GiB (CPU default: 2; GPU: from gpu_memory_utilization)"
    )
    startup_timeout_s: float = field(900.0, help="give up if replicas are not ready after this long")
    max_request_bytes: int | None = field(
        None, help="largest request body in bytes (larger: 413); default 8 MiB, 256 MiB for a model taking images")
    # --- multimodal ---
    limit_mm_per_prompt: str | None = field(
        None, help="images per prompt at most: N or vLLM's JSON '{\"image\": N}' (default: vLLM's, 999)")
    max_image_pixels: int = field(DEFAULT_MAX_IMAGE_PIXELS, help="largest image (width*height) taken; larger: 413")

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get("VROLL_API_KEY") or None
        check(self.tensor_parallel_size >= 1, f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        check(self.data_parallel_size >= 1, f"--data-parallel-size must be >= 1, got {self.data_parallel_size}")
        check(0 <= self.port <= 65535, f"--port must be in 0..65535, got {self.port}")
        check(0 < self.gpu_memory_utilization <= 1,
              f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        check(self.dtype in {"auto", "bfloat16", "float16", "float32", "half", "float"},
              f"--dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        check(self.max_model_len is None or self.max_model_len > 0,
              f"--max-model-len must be positive, got {self.max_model_len}")
        check(self.log_level.lower() in {"debug", "info", "warning", "error", "critical"},
              f"--log-level must be debug, info, warning or error, got {self.log_level!r}")
        check(self.max_request_bytes is None or self.max_request_bytes >= 1024,
              f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")
        check(self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0,
              f"--kv-cache-memory-gib must be positive, got {self.kv_cache_memory_gib}")
        check(self.max_image_pixels >= 1, f"--max-image-pixels must be >= 1, got {self.max_image_pixels}")
        self.images_per_prompt()  # validates --limit-mm-per-prompt

    def request_bytes(self, takes_images: bool) -> int:
        """``--max-request-bytes``, or its default: a step's images (base64 PNG) outgrow 8 MiB."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return 256 * 2**20 if takes_images else 8 * 2**20

    def images_per_prompt(self) -> int | None:
        """``--limit-mm-per-prompt`` as images per prompt (None: vLLM's default)."""
        raw = self.limit_mm_per_prompt
        if raw is None:
            return None
        try:
            value = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and set(value) <= {"image", "video"} and not value.get("video"):
            value = value.get("image")
        check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
              f"--limit-mm-per-prompt must be a count of images (>= 0) or JSON like '{{\"image\": 2}}' "
              f"(images only), got {raw!r}")
        return value

    def engine_spec(self, on_cpu: bool) -> EngineSpec:
        """What each replica builds its engine from (CPU engines default to a 2 GiB KV cache)."""
        kv = self.kv_cache_memory_gib if self.kv_cache_memory_gib is not None else (2.0 if on_cpu else None)
        return EngineSpec(
            model=resolve_model(self.model), served_name=self.model, revision=self.revision,
            tensor_parallel_size=self.tensor_parallel_size, dtype=self.dtype,
            max_model_len=self.max_model_len, gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching, enforce_eager=self.enforce_eager,
            seed=self.seed, kv_cache_memory_gib=kv, limit_images_per_prompt=self.images_per_prompt(),
        )
