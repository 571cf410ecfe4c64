"""``ServeConfig``: the flags of ``vroll serve`` (alias ``vroll vllm-serve``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from vroll.engine.config import EngineConfig, EngineSpec
from vroll.flags import Nested, check, field
from vroll.models import DEFAULT_MODEL, resolve_model
from vroll.server.connections import DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT_S, ConnectionLimits
from vroll.server.guards import DEFAULT_MAX_PROMPTS, DEFAULT_MAX_REQUEST_TOKENS
from vroll.server.images import DEFAULT_MAX_IMAGE_PIXELS

CPU_KV_CACHE_GIB = 2.0  # a CPU engine's KV cache unless --kv-cache-memory-gib says otherwise


@dataclass
class ServeConfig:
    model: str = field(DEFAULT_MODEL, help="model: 'smollm2-135m' (embedded), an HF id or a local folder")
    revision: str | None = field(None, help="model revision (branch, tag or commit) on the Hub")
    data_parallel_size: int = field(1, help="independent replicas (D); uses D*T devices")
    host: str = field("127.0.0.1", help="address to bind; non-loopback needs --api-key")
    port: int = field(8000, help="HTTP port (0 picks a free one and prints it)")
    seed: int = field(0, help="engine seed")
    api_key: str | None = field(None, help="require 'Authorization: Bearer KEY'; a flag shows in `ps`: prefer "
                                           "--api-key-file or the environment variable VROLL_API_KEY")
    api_key_file: str | None = field(None, help="read the API key from this file (its first line)")
    log_level: str = field("info", help="debug, info, warning or error")
    startup_timeout_s: float = field(900.0, help="give up if replicas are not ready after this long")
    max_request_bytes: int | None = field(
        None, help="largest request body in bytes (larger: 413); default 8 MiB, 256 MiB for a model taking images")
    max_image_pixels: int = field(DEFAULT_MAX_IMAGE_PIXELS, help="largest image (width*height) taken; larger: 413")
    max_request_tokens: int = field(
        DEFAULT_MAX_REQUEST_TOKENS, help="the work one request may ask for, n x (prompt + max_tokens) tokens over its "
                                         "prompts (more: 413; vroll's trainer splits its batches to fit)")
    max_prompts_per_request: int = field(DEFAULT_MAX_PROMPTS, help="prompts one request may carry (more: 413)")
    request_read_timeout_s: float = field(
        DEFAULT_READ_TIMEOUT_S, help="a request's head and body must arrive within this long (else 408, closed)")
    max_connections: int = field(DEFAULT_MAX_CONNECTIONS, help="open connections at most (one more: 503, closed)")
    fair_scheduling: bool = field(True, help="schedule requests that ask for less work first (vLLM's priority "
                                             "policy), so a huge request cannot hold a small one; false: first come")
    # every replica's engine: --tensor-parallel-size, --gpu-memory-utilization, --dtype, ... (a server never sleeps)
    engine = Nested(EngineConfig, "", exclude=("enable_sleep_mode",), dash=True, help={
        "tensor_parallel_size": "devices per replica (T)",
        "kv_cache_memory_gib": f"KV cache per replica in GiB (CPU default: {CPU_KV_CACHE_GIB:g}; GPU: from "
                               "gpu_memory_utilization)"})

    def __post_init__(self) -> None:
        if self.api_key_file is not None:
            check(self.api_key is None, "give the API key once: --api-key or --api-key-file")
            self.api_key = _read_key(self.api_key_file)
        if self.api_key is None:
            self.api_key = os.environ.get("VROLL_API_KEY") or None
        check(self.data_parallel_size >= 1, f"--data-parallel-size must be >= 1, got {self.data_parallel_size}")
        check(0 <= self.port <= 65535, f"--port must be in 0..65535, got {self.port}")
        check(self.log_level.lower() in {"debug", "info", "warning", "error", "critical"},
              f"--log-level must be debug, info, warning or error, got {self.log_level!r}")
        check(self.max_request_bytes is None or self.max_request_bytes >= 1024,
              f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")
        check(self.max_image_pixels >= 1, f"--max-image-pixels must be >= 1, got {self.max_image_pixels}")
        check(self.max_request_tokens >= 1, f"--max-request-tokens must be >= 1, got {self.max_request_tokens}")
        check(self.max_prompts_per_request >= 1,
              f"--max-prompts-per-request must be >= 1, got {self.max_prompts_per_request}")
        check(self.request_read_timeout_s > 0,
              f"--request-read-timeout-s must be > 0, got {self.request_read_timeout_s}")
        check(self.max_connections >= 1, f"--max-connections must be >= 1, got {self.max_connections}")
        self.engine  # noqa: B018 - builds the EngineConfig: validates the engine flags

    def request_bytes(self, takes_images: bool) -> int:
        """``--max-request-bytes``, or its default: a step's images (base64 PNG) outgrow 8 MiB."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return 256 * 2**20 if takes_images else 8 * 2**20

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(self.request_read_timeout_s, self.max_connections)

    def engine_spec(self, on_cpu: bool) -> EngineSpec:
        """What each replica builds its engine from (CPU engines default to a 2 GiB KV cache)."""
        engine = self.engine
        if engine.kv_cache_memory_gib is None and on_cpu:
            engine = dataclasses.replace(engine, kv_cache_memory_gib=CPU_KV_CACHE_GIB)
        return EngineSpec(model=resolve_model(self.model), served_name=self.model, revision=self.revision,
                          seed=self.seed, config=engine, fair_scheduling=self.fair_scheduling)


def _read_key(path: str) -> str:
    try:
        key = open(os.path.expanduser(path), encoding="utf-8").readline().strip()
    except OSError as exc:
        raise ValueError(f"--api-key-file {path}: {exc.strerror}") from None
    check(bool(key), f"--api-key-file {path} is empty")
    return key
