"""The engine's configuration: the options a user sets (``EngineConfig``) and what an engine is built from.

``EngineConfig`` is the one place an engine option is written: its field (type, default, help),
its check, and the vLLM argument it becomes (:meth:`EngineConfig.vllm_kwargs`). The commands
nest it (``vroll.flags.Nested``): ``vroll serve --gpu-memory-utilization``, the trainers'
``--vllm_gpu_memory_utilization`` (TRL's spelling, also ``GRPOConfig(vllm_gpu_memory_utilization=...)``
and ``args.vllm_gpu_memory_utilization``), ``vroll eval --colocate --gpu-memory-utilization``; the
server the trainer starts on a spare GPU gets them as flags (:func:`serve_flags`).

``EngineSpec`` is one engine to build: a model, a seed, an ``EngineConfig`` and what the
caller decides itself (how many sequences at once, the colocated engine's ``external_launcher``).
It crosses into the replica process as is. No vLLM import here: the server and the trainer read
this module without loading vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

from vroll.flags import check_field, field

Dtype = Literal["auto", "bfloat16", "float16", "float32", "half", "float"]

# Logprobs of the model's own distribution, before temperature or penalties: the quantity the
# trainer recomputes, so importance ratios compare like with like (``/server_info`` says it too).
LOGPROBS_MODE = "raw_logprobs"

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_rank_for(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``r``."""
    fits = [x for x in LORA_RANKS if x >= r]
    if not fits:
        raise ValueError(f"a LoRA rank of {r} is above vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")
    return fits[0]


@dataclass(frozen=True)
class EngineConfig:
    """A vLLM engine's options (see the module docstring)."""

    tensor_parallel_size: int = field(1, help="devices per engine (T)")
    gpu_memory_utilization: float = field(0.9, help="fraction of each GPU vLLM may use")
    dtype: Dtype = field("auto", help="weights/activations dtype: auto, bfloat16, float16, float32")
    max_model_len: int | None = field(None, help="context length (prompt + completion); default: the model's")
    enable_prefix_caching: bool | None = field(None, help="reuse KV cache across prompts sharing a prefix")
    enforce_eager: bool = field(False, help="skip torch.compile/CUDA graphs (faster start, slower decode)")
    kv_cache_memory_gib: float | None = field(None, help="KV cache per engine in GiB (default on GPU: from "
                                                         "gpu_memory_utilization)")
    enable_sleep_mode: bool = field(False, help="CUDA: the engine frees its GPU memory between generations")
    limit_mm_per_prompt: str | None = field(
        None, help="images per prompt at most: N or vLLM's JSON '{\"image\": N}' (default: vLLM's, 999)")
    enable_lora: bool = field(False, help="serve one LoRA adapter pushed in memory (the trainer's "
                                          "--vllm_lora_sync adapter)")
    max_lora_rank: int = field(16, help="enable_lora: the largest adapter rank the engine accepts (vLLM sizes its "
                                        "LoRA buffers by it): 1, 8, 16, 32, 64, 128, 256, 320 or 512")

    def __post_init__(self) -> None:
        check_field(self.tensor_parallel_size >= 1, "tensor_parallel_size",
                    f"must be >= 1, got {self.tensor_parallel_size}")
        check_field(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
                    f"must be in (0, 1], got {self.gpu_memory_utilization}")
        check_field(self.dtype in get_args(Dtype), "dtype",
                    f"must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        check_field(self.max_model_len is None or self.max_model_len > 0, "max_model_len",
                    f"must be positive, got {self.max_model_len}")
        check_field(self.kv_cache_memory_gib is None or self.kv_cache_memory_gib > 0, "kv_cache_memory_gib",
                    f"must be positive, got {self.kv_cache_memory_gib}")
        self.images_per_prompt()  # validates limit_mm_per_prompt
        check_field(self.max_lora_rank in LORA_RANKS, "max_lora_rank",
                    f"must be one of {', '.join(map(str, LORA_RANKS))} (vLLM's choices), got {self.max_lora_rank}")

    def images_per_prompt(self) -> int | None:
        """``limit_mm_per_prompt`` as images per prompt (None: vLLM's default)."""
        raw = self.limit_mm_per_prompt
        if raw is None:
            return None
        try:
            value = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict) and set(value) <= {"image", "video"} and not value.get("video"):
            value = value.get("image")
        check_field(isinstance(value, int) and not isinstance(value, bool) and value >= 0, "limit_mm_per_prompt",
                    f"must be a count of images (>= 0) or JSON like '{{\"image\": 2}}' (images only), got {raw!r}")
        return value

    def vllm_kwargs(self) -> dict[str, Any]:
        """The options as ``vllm.LLM`` / ``AsyncEngineArgs`` arguments (unset ones left to vLLM)."""
        kwargs: dict[str, Any] = dict(tensor_parallel_size=self.tensor_parallel_size, dtype=self.dtype,
                                      max_model_len=self.max_model_len,
                                      gpu_memory_utilization=self.gpu_memory_utilization,
                                      enforce_eager=self.enforce_eager)
        if self.enable_prefix_caching is not None:
            kwargs["enable_prefix_caching"] = self.enable_prefix_caching
        if self.kv_cache_memory_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_memory_gib * 2**30)
        if (images := self.images_per_prompt()) is not None:  # ignored by vLLM for a text-only model
            kwargs["limit_mm_per_prompt"] = {"image": images}
        if self.enable_lora:  # one adapter at a time: the trainer's latest version
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1)
        return kwargs  # enable_sleep_mode: the adapter decides (CUDA only)


@dataclass(frozen=True)
class EngineSpec:
    """Everything one engine is built from (a server replica's, or the trainer's colocated one)."""

    model: str  # a local folder or a Hugging Face id, already resolved
    served_name: str  # what /info reports (the name the user typed)
    revision: str | None = None
    seed: int = 0
    config: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    # sequences decoded at once; None: vLLM's default. It also bounds the CUDA graphs captured at start
    max_num_seqs: int | None = None
    # "external_launcher": the engine joins the caller's torch.distributed world (colocate mode)
    distributed_executor_backend: str | None = None
    # a server's: a request asking for less work is scheduled first (vLLM's priority policy, by the
    # request's work class), so one client's huge request cannot hold another's small one
    fair_scheduling: bool = False


def serve_flags(config: EngineConfig, skip: tuple[str, ...] = ()) -> list[str]:
    """``vroll serve`` flags that give a server ``config`` (the options that differ from its defaults)."""
    flags: list[str] = []
    default = EngineConfig()
    for f in dataclasses.fields(EngineConfig):
        value = getattr(config, f.name)
        if f.name in skip or value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        flags += [flag] if value is True else [flag, "false"] if value is False else [flag, str(value)]
    return flags
