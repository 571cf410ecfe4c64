"""The wire types: HTTP bodies (pydantic) and the typed messages between processes.

Everything that crosses a process boundary in vroll is one of these types, never a
string-keyed dict: the HTTP API validates its bodies with the pydantic models below
(strict, unknown fields rejected), and the server talks to its replica processes with
the dataclasses at the bottom. One type per concept end to end: ``SamplingSpec`` goes
from the trainer through the client, the HTTP body and the replica pipe to the engine;
``GenerateResult`` comes back from the engine through the server (as JSON) to the client;
a ``Bucket`` of ``TensorMeta`` is the weight-sync plan that the trainer, the server and the
workers agree on before any byte moves.

The bottom layer: this module imports nothing else of vroll, and no torch (the HTTP client
needs none), so dtypes travel by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, field_validator, model_validator

# ------------------------------------------------------------- the weight-sync contract

# Wire dtype names -> bytes per element (``vroll.weightsync.buckets.DTYPES`` maps them to torch dtypes).
DTYPE_SIZES: dict[str, int] = {
    "bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1,
    "int32": 4, "int64": 8, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}
FLOATING_DTYPES = frozenset({"bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"})


def dtype_size(name: str) -> int:
    """Bytes per element of a wire dtype, with a clear error for an unknown one."""
    try:
        return DTYPE_SIZES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPE_SIZES)}") from None


def is_floating(name: str) -> bool:
    """Whether a wire dtype name is a floating-point type (False for unknown names)."""
    return name in FLOATING_DTYPES


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
        return self.numel * dtype_size(self.dtype)


@dataclass(frozen=True)
class Bucket:
    """The tensors of one broadcast, in packing order, all of one dtype."""

    dtype: str
    tensors: tuple[TensorMeta, ...]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    @classmethod
    def from_rpc(cls, value: Bucket | dict[str, Any]) -> Bucket:
        """A bucket as it arrives in a vLLM worker: vLLM's multiprocess RPC (msgpack, vLLM 0.22 on
        GPU) turns dataclasses into dicts on the way, the in-process one keeps them."""
        if isinstance(value, Bucket):
            return value
        tensors = tuple(t if isinstance(t, TensorMeta) else TensorMeta(t["name"], t["dtype"], tuple(t["shape"]))
                        for t in value["tensors"])
        return cls(value["dtype"], tensors)


# --------------------------------------------------------------------------- HTTP


class _Strict(BaseModel):
    # strict: no coercion ("yes" is not a bool, "3" is not an int); unknown fields are refused
    model_config = ConfigDict(extra="forbid", strict=True)


MAX_N = 1024
MAX_SEED = 2**63  # vLLM seeds are signed 64-bit; prompt i uses seed + i
MAX_TOKENS = 2**31 - 1  # the server also caps it at the context length
MAX_STOP_STRINGS = 64  # vLLM checks every stop string against the text after every decode step
MAX_STOP_CHARS = 256


def _no_surrogates(text: str, where: str) -> str:
    """A lone surrogate (JSON ``"\\ud800"``) is valid Python but no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} is not valid Unicode ({exc.reason} at character {exc.start})") from None
    return text


class SamplingSpec(BaseModel):
    """How to sample: the one sampling type from the trainer, through the client and HTTP, to the engine.

    Strict: no silent coercion (``n: "3"``, ``n: true`` and ``ignore_eos: "yes"`` are errors),
    every number bounded and finite. The field names are TRL's server names, so the
    flat JSON body of TRL's client is accepted as is.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    n: int = Field(1, ge=1, le=MAX_N, description="completions per prompt")
    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(-1, ge=-1, le=MAX_TOKENS, description="-1 disables top-k")
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS, description="completion tokens at most")
    stop: tuple[str, ...] = Field((), description="stop strings (JSON: a list or null)")
    seed: int | None = Field(None, ge=0, lt=MAX_SEED, description="per-request seed; prompt i uses seed + i")
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks)")
    return_logprobs: bool = Field(True, description="each sampled token's logprob (false: vLLM skips that work "
                                                    "every decode step, and completions carry [])")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: object) -> object:
        return () if v is None else tuple(v) if isinstance(v, list) else v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(v)} stop strings; at most {MAX_STOP_STRINGS} are taken")
        for i, s in enumerate(v):
            if not s:
                raise ValueError(f"stop string {i} is empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop string {i} has {len(s)} characters; at most {MAX_STOP_CHARS} are taken")
            _no_surrogates(s, f"stop string {i}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k_nonzero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return v

    @model_validator(mode="after")
    def _greedy_is_single(self) -> SamplingSpec:
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"n={self.n} with temperature=0 would return {self.n} identical greedy "
                             "completions; use n=1 or a temperature > 0")
        return self

    def seed_overflow(self, num_prompts: int) -> str | None:
        """Why ``num_prompts`` prompts cannot use this seed (the per-prompt seeds leave int64), or None."""
        if self.seed is None or self.seed + num_prompts * self.n - 1 < MAX_SEED:
            return None
        return (f"seed {self.seed} is too large for {num_prompts} prompt(s) x n={self.n}: prompt i uses "
                f"seed + i, so seed + prompts * n - 1 must stay below 2**63")

    def sampling(self) -> SamplingSpec:
        """Just the sampling fields (a request body is a ``SamplingSpec`` plus its prompts)."""
        if type(self) is SamplingSpec:
            return self
        return SamplingSpec.model_construct(**{k: getattr(self, k) for k in SamplingSpec.model_fields})


# An image on the wire: base64 PNG/JPEG/..., bare or as a data URL ("data:image/png;base64,...").
ImageData = Annotated[str, Field(min_length=1)]


class GenerateRequest(SamplingSpec):
    """POST /generate: prompts as texts or as token-id lists, and the sampling fields flat (TRL's body).

    ``images``: one entry per prompt (TRL's vllm-serve body): an image, a list of images, or
    null. Each image fills one placeholder of its prompt, in order (Qwen2-VL:
    ``<|vision_start|><|image_pad|><|vision_end|>``, one ``<|image_pad|>`` per image).
    """

    prompts: list[str] | list[list[int]] = Field(..., min_length=1)
    images: list[ImageData | list[ImageData] | None] | None = None

    def prompt_images(self) -> list[list[str]]:
        """The images of each prompt as lists (``[]`` for none); the server checks the lengths agree."""
        if self.images is None:
            return [[] for _ in self.prompts]
        return [[] if im is None else [im] if isinstance(im, str) else list(im) for im in self.images]

    @field_validator("prompts")
    @classmethod
    def _non_empty(cls, v: list) -> list:
        for i, p in enumerate(v):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if isinstance(p, str):
                _no_surrogates(p, f"prompt {i}")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    """An image part, as in Hugging Face chat templates; the image itself rides along in ``image``."""

    type: Literal["image"]
    image: ImageData


class ImageUrl(_Strict):
    url: ImageData  # a data URL (or bare base64): the server fetches nothing


class ImageUrlPart(_Strict):
    """OpenAI's image part (what TRL's client sends)."""

    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart | ImageUrlPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: str
    content: list[ContentPart] | str  # the list first: its errors are the helpful ones

    def text(self) -> str:
        """Every text of the message (for validation)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def images(self) -> list[str]:
        """The message's images, in order."""
        if isinstance(self.content, str):
            return []
        return [p.image if isinstance(p, ImagePart) else p.image_url.url
                for p in self.content if not isinstance(p, TextPart)]

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it: image parts become ``{"type": "image"}``.

        Text-only parts are joined into one string, which every template (text models' too) accepts.
        """
        if isinstance(self.content, str) or all(isinstance(p, TextPart) for p in self.content):
            return {"role": self.role, "content": self.text()}
        parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                 for p in self.content]
        return {"role": self.role, "content": parts}


class ChatRequest(SamplingSpec):
    """POST /chat: conversations rendered with the model's chat template."""

    messages: list[list[ChatMessage]] = Field(..., min_length=1)
    add_generation_prompt: bool = True

    @field_validator("messages")
    @classmethod
    def _valid_text(cls, v: list[list[ChatMessage]]) -> list[list[ChatMessage]]:
        for i, conv in enumerate(v):
            for j, m in enumerate(conv):
                _no_surrogates(m.role + m.text(), f"conversation {i} message {j}")
        return v


def _nulls_to_nan(v: object) -> object:
    if isinstance(v, list) and None in v:
        return [math.nan if x is None else x for x in v]
    return v


# JSON has no NaN: a non-finite logprob (a model that produced NaNs) is sent as null and read back as NaN.
Logprobs = Annotated[list[float], BeforeValidator(_nulls_to_nan)]


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    logprobs: Logprobs  # of each sampled token, under the model's raw distribution; NaN if non-finite
    finish_reason: str | None  # "stop", "length" (max_tokens or the context), or None


@dataclass(frozen=True)
class PromptResult:
    prompt_token_ids: list[int]
    completions: list[Completion]


@dataclass(frozen=True)
class GenerateResult:
    """The one result type: built by the engine, sent by the server as JSON, returned by the client."""

    results: list[PromptResult]  # one per prompt, in input order
    weight_version: int

    def flat(self) -> list[Completion]:
        """All completions, prompt-major: prompt 0's n completions first."""
        return [c for r in self.results for c in r.completions]

    def to_json(self) -> bytes:
        """The HTTP response body (NaN logprobs become null)."""
        return _RESULT_ADAPTER.dump_json(self)

    @classmethod
    def from_json(cls, body: bytes | str) -> GenerateResult:
        return _RESULT_ADAPTER.validate_json(body)


_RESULT_ADAPTER: TypeAdapter[GenerateResult] = TypeAdapter(GenerateResult)


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
    # --- multimodal ---
    takes_images: bool = False  # a vision-language model: prompts may carry images
    max_images_per_prompt: int = 0  # 0 for a text-only model
    max_image_pixels: int = 0  # an image of more pixels (width x height) gets 413
    max_request_bytes: int = 0  # the largest request body (images included); larger gets 413
    # --- work per request (0: a server that states none) ---
    max_request_tokens: int = 0  # n x (prompt + max_tokens) summed over the prompts; more gets 413
    max_prompts_per_request: int = 0
    max_lora_rank: int = 0  # the largest LoRA adapter the server takes (--enable-lora); 0: no adapters


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
        return Bucket(self.dtype, tuple(TensorMeta(t.name, self.dtype, tuple(t.shape)) for t in self.tensors))


class LoraSpec(_Strict):
    """What a LoRA-only sync's tensors are: PEFT's adapter config fields vLLM builds the adapter with."""

    r: int = Field(..., ge=1, le=512)
    lora_alpha: float = Field(..., gt=0, allow_inf_nan=False)
    target_modules: list[str] | str
    use_rslora: bool = False


class WeightsUpdateRequest(_Strict):
    """POST /weights/update: one call per sync, the buckets in broadcast order."""

    session_id: str = Field(..., min_length=1, max_length=128)
    buckets: list[BucketSpec] = Field(..., min_length=1)
    atomic: bool = Field(True, description="receive everything before loading any of it")
    allow_partial_layers: bool = Field(
        False, description="benchmarks only: accept a manifest covering part of a layer; vLLM's layerwise "
                           "reload then leaves the rest of that layer uninitialized")
    lora: LoraSpec | None = Field(
        None, description="the buckets hold a LoRA adapter's factors (PEFT names), served as the next adapter "
                          "version over unchanged base weights (a server started with --enable-lora)")

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


# ------------------------------------------- vLLM's routes, as TRL's VLLMClient speaks them

# vLLM's default size of one packed broadcast (``vllm.distributed.weight_transfer.packed_tensor``): both
# sides must split the stream at the same points, and TRL's client never sends its own.
PACKED_BUFFER_BYTES = 2**30


def _disabled_top_k(v: object) -> object:
    return -1 if v == 0 else v  # OpenAI/vLLM spell "no top-k" 0 (or -1); vroll spells it -1


class _OpenAISampling(_Strict):
    """The sampling fields of vLLM's OpenAI routes that vroll serves; any other field is refused by name."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: Annotated[int, BeforeValidator(_disabled_top_k)] = Field(-1, ge=-1, le=MAX_TOKENS)
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    ignore_eos: bool = False
    stream: Literal[False] = Field(False, description="streaming is not served: send false or leave it out")
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False

    def sampling_spec(self, logprobs: bool) -> SamplingSpec:
        """The one sampling type (its checks too: greedy with n > 1 is refused there)."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return SamplingSpec(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                            max_tokens=self.max_tokens, stop=tuple(stop or ()), seed=self.seed,
                            ignore_eos=self.ignore_eos, return_logprobs=logprobs)


def _only_sampled_logprob(v: int | None, field: str) -> int | None:
    if v is not None and v != 0:
        raise ValueError(f"{field} {v}: vroll serve returns the sampled token's logprob only; ask {field} 0 "
                         "(the sampled token, what TRL's trainers use) or null")
    return v


class CompletionsRequest(_OpenAISampling):
    """POST /v1/completions: texts or token-id lists (TRL's ``VLLMClient.generate``)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, description="0: the sampled token's logprob; null: none")

    @field_validator("logprobs")
    @classmethod
    def _sampled_only(cls, v: int | None) -> int | None:
        return _only_sampled_logprob(v, "logprobs")

    @field_validator("prompt")
    @classmethod
    def _prompts_non_empty(cls, v: object) -> object:
        if v == [] or v == "":
            raise ValueError("no prompt given")
        for i, p in enumerate(v if isinstance(v, list) and not isinstance(v[0], int) else [v]):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            if isinstance(p, str):
                _no_surrogates(p, f"prompt {i}")
        return v

    def prompt_list(self) -> list[str] | list[list[int]]:
        """Always a list of prompts (OpenAI also takes one prompt bare)."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return self.prompt  # type: ignore[return-value]


class ChatCompletionsRequest(_OpenAISampling):
    """POST /v1/chat/completions: one conversation (TRL's ``VLLMClient.chat`` sends one per request)."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="rendered into the prompt by the template")
    tool_choice: Literal["none"] | None = Field(None, description="the server parses no tool calls: 'none'")

    @field_validator("top_logprobs")
    @classmethod
    def _sampled_only(cls, v: int | None) -> int | None:
        return _only_sampled_logprob(v, "top_logprobs")

    @field_validator("messages")
    @classmethod
    def _valid_text(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        for j, m in enumerate(v):
            _no_surrogates(m.role + m.text(), f"message {j}")
        return v

    def template_kwargs(self) -> dict[str, Any]:
        """What ``apply_chat_template`` gets besides the messages."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        if self.tools:
            kwargs["tools"] = self.tools
        return kwargs


class TransferInitInfo(_Strict):
    """vLLM's NCCL engine init info: the trainer (rank 0) hosts the rendezvous, the workers follow it."""

    master_address: str = Field(..., min_length=1, max_length=255)
    master_port: int = Field(..., ge=1, le=65535)
    rank_offset: int = Field(1, ge=1, description="rank of the first worker; the trainer's ranks come before")
    world_size: int = Field(..., ge=2)
    packed: bool = False
    packed_buffer_size_bytes: int = Field(PACKED_BUFFER_BYTES, ge=1)
    packed_num_buffers: int = Field(2, ge=1, description="the sender's pipelining; the stream is the same")
    nccl_unique_id_b64: str | None = None

    @field_validator("nccl_unique_id_b64")
    @classmethod
    def _tcp_rendezvous(cls, v: str | None) -> None:
        if v is not None:
            raise ValueError("the unique-id rendezvous is not served: send master_address and master_port")
        return v


class TransferInitRequest(_Strict):
    """POST /init_weight_transfer_engine."""

    init_info: TransferInitInfo


class TransferUpdateInfo(_Strict):
    """vLLM's update info: the tensors about to be broadcast, in broadcast order."""

    names: list[Annotated[str, Field(min_length=1)]] = Field(..., min_length=1)
    dtype_names: list[str]
    shapes: list[list[Annotated[int, Field(ge=0)]]]
    packed: bool | None = Field(None, description="before vLLM 0.28 the client says it here, not at init")
    is_checkpoint_format: bool = Field(True, description="names and shapes as in the checkpoint (only these)")

    @model_validator(mode="after")
    def _aligned(self) -> TransferUpdateInfo:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes must be as long as each other, got "
                             f"{len(self.names)}, {len(self.dtype_names)} and {len(self.shapes)}")
        if not self.is_checkpoint_format:
            raise ValueError("is_checkpoint_format false: vroll serve loads checkpoint-format tensors only")
        return self

    def tensors(self) -> list[TensorMeta]:
        return [TensorMeta(n, d, tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes,
                                                                 strict=True)]


class TransferUpdateRequest(_Strict):
    """POST /update_weights."""

    update_info: TransferUpdateInfo


class TransferBracketRequest(_Strict):
    """POST /start_weight_update and /finish_weight_update: an empty body (vLLM's optional fields allowed)."""

    is_checkpoint_format: bool = True
    weight_version: None = Field(None, description="vroll serve numbers its versions itself: leave it out")

    @field_validator("weight_version", mode="before")
    @classmethod
    def _own_versions(cls, v: object) -> None:
        if v is not None:
            raise ValueError(f"weight_version {v!r}: vroll serve numbers its weight versions itself (the reply's "
                             "weight_version, GET /weight_info); leave it out")
        return None

    @field_validator("is_checkpoint_format")
    @classmethod
    def _checkpoint_only(cls, v: bool) -> bool:
        if not v:
            raise ValueError("is_checkpoint_format false: vroll serve loads checkpoint-format tensors only")
        return v


# ------------------------------------------------------------- between processes


@dataclass(frozen=True)
class EngineInfo:
    """What a replica reports once its engine is up."""

    model: str
    dtype: str
    max_model_len: int
    vllm_version: str
    device: str
    gpu_uuids: tuple[str, ...] = ()  # the GPUs this engine's workers use (empty on CPU)
    # --- multimodal ---
    max_images_per_prompt: int = 0  # 0: a text-only model
    image_token_id: int | None = None  # the one placeholder token per image in a prompt, where known
    max_lora_rank: int = 0  # the engine's (enable_lora); 0: it serves no adapters


@dataclass(frozen=True)
class PromptInput:
    """One prompt as it goes to an engine: the one prompt type of the trainer, the server and the engine.

    With images, ``token_ids`` holds ONE image placeholder token per image, where the chat template put
    ``{"type": "image"}``; the engine expands each to the image's patch count, and
    ``PromptResult.prompt_token_ids`` returns the expanded ids the model actually ran.
    """

    token_ids: list[int]
    images: tuple[Any, ...] = ()  # PIL images (RGB), in placeholder order


@dataclass(frozen=True)
class GenerateJob:
    prompts: list[PromptInput]
    sampling: SamplingSpec
    first_index: int  # global index of prompts[0]: keeps seeds independent of DP


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
    lora: dict | None = None  # a LoRA-only sync: LoraSpec's fields; the adapter's version is update_id


@dataclass(frozen=True)
class ReceiveResult:
    """One worker's outcome of a ``WeightsReceiveJob``."""

    ok: bool
    intact: bool  # the model holds a complete set of weights (the new ones, or the old ones kept)
    message: str = ""

    @classmethod
    def from_rpc(cls, value: ReceiveResult | dict) -> ReceiveResult:
        """As returned by vLLM's worker RPC: a dict where it serializes with msgpack (vLLM 0.22 on GPU)."""
        return value if isinstance(value, ReceiveResult) else cls(**value)


@dataclass(frozen=True)
class WeightsCloseJob:
    pass


@dataclass(frozen=True)
class TransferInitJob:
    """Join the trainer's group through vLLM's rendezvous (``vroll.engine.native_transfer``)."""

    host: str
    port: int
    world_size: int
    rank_offset: int  # rank of this replica's TP worker 0
    timeout_s: float


@dataclass(frozen=True)
class TransferReceiveJob:
    """Receive one ``/update_weights`` into the workers' staging area (loaded at commit)."""

    tensors: tuple[TensorMeta, ...]  # in broadcast order
    packed: bool
    buffer_bytes: int
    discard: bool = False  # a refused manifest: take the bytes off the wire (the sender is released), keep none


@dataclass(frozen=True)
class TransferCommitJob:
    """``/finish_weight_update``: load everything staged, at once."""


@dataclass(frozen=True)
class TransferDropJob:
    """Forget what is staged (a refused or restarted update)."""


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
    | TransferInitJob | TransferReceiveJob | TransferCommitJob | TransferDropJob | ShutdownJob
)
Reply = GenerateResult | JobDone | JobFailed
