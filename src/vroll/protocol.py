"""The wire types: HTTP bodies (pydantic) and the typed messages between processes.

Everything that crosses a process boundary in vroll is one of these types, never a
string-keyed dict: the HTTP API validates its bodies with the pydantic models below
(unknown fields are rejected), and the server talks to its replica processes with the
dataclasses at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:  # torch-free at runtime: the HTTP client needs no torch
    from vroll.weightsync.buckets import Bucket

# --------------------------------------------------------------------------- HTTP


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(_Strict):
    """Sampling parameters shared by /generate and /chat (TRL's server names)."""

    n: int = Field(1, ge=1, le=1024, description="completions per prompt")
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 disables top-k")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    max_tokens: int = Field(16, ge=1, description="completion tokens at most")
    stop: list[str] | None = None
    seed: int | None = Field(None, description="per-request seed; prompt i uses seed + i")
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks)")

    @field_validator("top_k")
    @classmethod
    def _top_k_nonzero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return v

    @model_validator(mode="after")
    def _greedy_is_single(self) -> SamplingFields:
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"n={self.n} with temperature=0 would return {self.n} identical greedy "
                             "completions; use n=1 or a temperature > 0")
        return self


class GenerateRequest(SamplingFields):
    """POST /generate: prompts as texts or as token-id lists."""

    prompts: list[str] | list[list[int]] = Field(..., min_length=1)

    @field_validator("prompts")
    @classmethod
    def _non_empty(cls, v: list) -> list:
        for i, p in enumerate(v):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
        return v


class ChatMessage(_Strict):
    role: str
    content: str


class ChatRequest(SamplingFields):
    """POST /chat: conversations rendered with the model's chat template."""

    messages: list[list[ChatMessage]] = Field(..., min_length=1)
    add_generation_prompt: bool = True


class CompletionOut(BaseModel):
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None


class PromptOut(BaseModel):
    prompt_token_ids: list[int]
    completions: list[CompletionOut]


class GenerateResponse(BaseModel):
    results: list[PromptOut]
    weight_version: int


class InfoResponse(BaseModel):
    model: str
    dtype: str
    max_model_len: int
    tensor_parallel_size: int
    data_parallel_size: int
    vllm_version: str
    device: str
    gpu_uuids: list[str] = []  # every GPU the replicas use (empty on CPU): the trainer checks it shares none
    weight_version: int


class HealthResponse(BaseModel):
    status: Literal["ok", "starting", "unhealthy"]
    replicas: list[str]


SESSION_HEADER = "X-Vroll-Session"  # GET /weights/update/{id} names its session here, not in the URL (logs)
SYNC_TIMEOUT_RANGE_S = (1.0, 600.0)


class WeightsInitRequest(_Strict):
    """POST /weights/init: where the trainer's rendezvous store listens."""

    host: str = Field(..., min_length=1, max_length=255)
    port: int = Field(..., ge=1, le=65535)
    backend: Literal["nccl", "gloo"] = "gloo"
    timeout_s: float = Field(600.0, description="collective timeout, 1..600 s (400 otherwise)")
    force: bool = Field(False, description="take over from a trainer that still answers")


class WeightsInitResponse(BaseModel):
    world_size: int
    trainer_rank: int
    session_id: str
    dtype: str


class TensorSpec(_Strict):
    name: str = Field(..., min_length=1)
    shape: list[Annotated[int, Field(ge=0)]]


class BucketSpec(_Strict):
    """One ``Bucket`` on the wire: the dtype once, then each tensor's name and shape."""

    dtype: str
    tensors: list[TensorSpec] = Field(..., min_length=1)

    @classmethod
    def from_bucket(cls, bucket: Bucket) -> BucketSpec:
        return cls(dtype=bucket.dtype,
                   tensors=[TensorSpec(name=t.name, shape=list(t.shape)) for t in bucket.tensors])

    def to_bucket(self) -> Bucket:
        from vroll.weightsync.buckets import Bucket, TensorMeta  # see TYPE_CHECKING above

        return Bucket(self.dtype, tuple(TensorMeta(t.name, self.dtype, tuple(t.shape)) for t in self.tensors))


class WeightsUpdateRequest(_Strict):
    """POST /weights/update: one call per sync, the buckets in broadcast order."""

    session_id: str = Field(..., min_length=1, max_length=128)
    buckets: list[BucketSpec] = Field(..., min_length=1)
    atomic: bool = Field(True, description="receive everything before loading any of it")
    allow_partial_layers: bool = Field(
        False, description="benchmarks only: accept a manifest covering part of a layer; vLLM's layerwise "
                           "reload then leaves the rest of that layer uninitialized")

    def plan(self) -> list[Bucket]:
        return [b.to_bucket() for b in self.buckets]


class WeightsCloseRequest(_Strict):
    """POST /weights/close: ends the named session (only the current one)."""

    session_id: str = Field(..., min_length=1, max_length=128)


class WeightsUpdateResponse(BaseModel):
    update_id: int
    num_buckets: int
    num_bytes: int


class WeightsUpdateStatus(BaseModel):
    update_id: int
    state: Literal["running", "done", "failed"]
    weight_version: int
    error: str | None = None


class ErrorBody(BaseModel):
    error: str


# ------------------------------------------------------------- between processes


@dataclass(frozen=True)
class SamplingSpec:
    """Sampling parameters as the engine adapter takes them."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    @classmethod
    def from_fields(cls, f: SamplingFields) -> SamplingSpec:
        return cls(
            n=f.n, temperature=f.temperature, top_p=f.top_p, top_k=f.top_k, min_p=f.min_p,
            repetition_penalty=f.repetition_penalty, max_tokens=f.max_tokens,
            stop=tuple(f.stop or ()), seed=f.seed, ignore_eos=f.ignore_eos,
        )


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None


@dataclass(frozen=True)
class PromptResult:
    prompt_token_ids: list[int]
    completions: list[Completion]


@dataclass(frozen=True)
class EngineSpec:
    """Everything a replica needs to build its engine (set by ``vroll serve``)."""

    model: str  # a local folder or a Hugging Face id, already resolved
    served_name: str  # what /info reports (the name the user typed)
    revision: str | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool | None = None
    enforce_eager: bool = False
    seed: int = 0
    kv_cache_memory_gib: float | None = None
    enable_sleep_mode: bool = False  # CUDA only: release weights and KV cache between generations
    # "external_launcher": the engine joins the caller's torch.distributed world (colocate mode)
    distributed_executor_backend: str | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What a replica reports once its engine is up."""

    model: str
    dtype: str
    max_model_len: int
    vllm_version: str
    device: str
    gpu_uuids: tuple[str, ...] = ()  # the GPUs this engine's workers use (empty on CPU)


@dataclass(frozen=True)
class GenerateJob:
    prompt_ids: list[list[int]]
    sampling: SamplingSpec
    first_index: int  # global index of prompt_ids[0]: keeps seeds independent of DP


@dataclass(frozen=True)
class GenerateResult:
    results: list[PromptResult]
    weight_version: int


@dataclass(frozen=True)
class ResetPrefixCacheJob:
    pass


@dataclass(frozen=True)
class WeightsInitJob:
    host: str
    port: int
    backend: str
    world_size: int
    rank_offset: int  # rank of this replica's TP worker 0 in the trainer's group
    timeout_s: float
    session_id: str


@dataclass(frozen=True)
class WeightsReceiveJob:
    buckets: list[Bucket]  # in broadcast order; passed as is to every worker
    atomic: bool
    update_id: int


@dataclass(frozen=True)
class ReceiveResult:
    """One worker's outcome of a ``WeightsReceiveJob``."""

    ok: bool
    intact: bool  # the model holds a complete set of weights (the new ones, or the old ones kept)
    message: str = ""


@dataclass(frozen=True)
class WeightsCloseJob:
    pass


@dataclass(frozen=True)
class ShutdownJob:
    pass


@dataclass(frozen=True)
class JobDone:
    weight_version: int
    detail: str = ""


@dataclass(frozen=True)
class JobFailed:
    """A job that failed; ``status`` is the HTTP status the server should answer."""

    status: int
    message: str
    fatal: bool = False  # the replica can no longer serve (e.g. half-loaded weights)


@dataclass(frozen=True)
class ReplicaReady:
    info: EngineInfo


@dataclass(frozen=True)
class ReplicaStartFailed:
    message: str


Job = (
    GenerateJob | ResetPrefixCacheJob | WeightsInitJob | WeightsReceiveJob | WeightsCloseJob
    | ShutdownJob
)
Reply = GenerateResult | JobDone | JobFailed


@dataclass
class ReplicaStatus:
    """Server-side view of one replica, for /health."""

    index: int
    state: Literal["starting", "ready", "restarting", "dead"] = "starting"
    reason: str = ""
    info: EngineInfo | None = field(default=None)
