"""The HTTP API (FastAPI). Routes only: the work happens in the pool and the replicas."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from vroll.batching import split_evenly
from vroll.protocol import (
    SESSION_HEADER,
    ChatRequest,
    EngineInfo,
    GenerateJob,
    GenerateRequest,
    GenerateResult,
    HealthResponse,
    InfoResponse,
    JobFailed,
    PromptInput,
    ResetPrefixCacheJob,
    SamplingSpec,
    WeightsCloseRequest,
    WeightsInitRequest,
    WeightsInitResponse,
    WeightsUpdateRequest,
    WeightsUpdateResponse,
    WeightsUpdateStatus,
)
from vroll.server.errors import ApiError
from vroll.server.guards import BodyLimit, KeyCheck, RequestLimits, api_key_check, error_response
from vroll.server.images import DEFAULT_MAX_IMAGE_PIXELS, decode_prompt_images
from vroll.server.pause import PauseGate
from vroll.server.pool import ClientGone, ReplicaDied, ReplicaPool
from vroll.server.weights import WeightSessions

log = logging.getLogger("vroll.server")


@dataclass
class ServerState:
    """Everything the routes need, owned by the app (no module globals)."""

    pool: ReplicaPool
    tokenizer: Any
    api_key: str | None
    dp: int
    tp: int
    info: EngineInfo | None = None
    weights: WeightSessions | None = None
    startup_error: str | None = None
    max_request_bytes: int = 8 * 2**20
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    limits: RequestLimits = field(default_factory=RequestLimits)
    gate: PauseGate = field(default_factory=PauseGate)  # vLLM's /pause and /resume

    def ready_info(self) -> EngineInfo:
        if self.info is None or not self.pool.healthy:
            raise ApiError(503, self.health_reason())
        return self.info

    def health_reason(self) -> str:
        return self.pool.unhealthy_reason() or "replicas are still starting"

    def __post_init__(self) -> None:
        self.pool.on_restart.append(self._replica_restarted)

    def _replica_restarted(self, index: int) -> None:
        """A restarted replica serves the base weights: /info must not claim the synced version."""
        if self.weights is not None:
            self.weights.replica_versions[index] = 0


def _check_prompts(prompt_ids: list[list[int]], sampling: SamplingSpec, info: EngineInfo, vocab: int,
                   limits: RequestLimits) -> None:
    """What the request type cannot know: the context length, the vocabulary, the prompt count, the work."""
    limits.check_count(len(prompt_ids))
    if sampling.max_tokens > info.max_model_len:
        raise ApiError(400, f"max_tokens {sampling.max_tokens} exceeds the context length "
                            f"(max_model_len {info.max_model_len})")
    overflow = sampling.seed_overflow(len(prompt_ids))
    if overflow:
        raise ApiError(400, overflow)
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= info.max_model_len:
            raise ApiError(400, f"prompt {i} has {len(ids)} tokens; the context is {info.max_model_len} "
                                "tokens (max_model_len), which must hold the prompt and at least one "
                                "completion token")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt {i} has token id {bad}, outside the vocabulary [0, {vocab})")
    limits.check_work([len(ids) for ids in prompt_ids], sampling)


def _check_image_counts(counts: list[int], info: EngineInfo) -> None:
    """Images for a text-only model, or more per prompt than the engine allows: 400 before any work."""
    if not any(counts):
        return
    if info.max_images_per_prompt == 0:
        raise ApiError(400, f"the served model {info.model} takes no images (a text-only model); "
                            "send prompts without images")
    for i, n in enumerate(counts):
        if n > info.max_images_per_prompt:
            raise ApiError(400, f"prompt {i} has {n} images; this server takes at most "
                                f"{info.max_images_per_prompt} per prompt (--limit-mm-per-prompt)")


def _check_placeholders(prompt_ids: list[list[int]], counts: list[int], info: EngineInfo) -> None:
    """Each image fills one placeholder token: their counts must agree (vLLM expands each one)."""
    if info.image_token_id is None:
        return
    for i, (ids, n) in enumerate(zip(prompt_ids, counts, strict=True)):
        found = ids.count(info.image_token_id)
        if found != n:
            raise ApiError(400, f"prompt {i} has {found} image placeholder(s) (token id {info.image_token_id}) "
                                f"but {n} image(s): put one placeholder per image, as the chat template does "
                                "for an image part")


async def run_generate(state: ServerState, prompt_ids: list[list[int]], images: list[list[str]],
                       sampling: SamplingSpec, request: Request) -> GenerateResult:
    """Check, split over the replicas, gather: one weight version for the whole response."""
    info = state.ready_info()
    counts = [len(x) for x in images]
    _check_image_counts(counts, info)
    # Off the event loop: a long prompt list must not stall /health and the other requests.
    await asyncio.to_thread(_check_prompts, prompt_ids, sampling, info, len(state.tokenizer), state.limits)
    await asyncio.to_thread(_check_placeholders, prompt_ids, counts, info)
    decoded = (await asyncio.to_thread(decode_prompt_images, images, state.max_image_pixels) if any(counts)
               else [()] * len(prompt_ids))
    prompts = [PromptInput(ids, ims) for ids, ims in zip(prompt_ids, decoded, strict=True)]
    ranges = split_evenly(len(prompts), state.dp)  # replica r continues the seeds at its first prompt
    jobs = [GenerateJob(prompts[a:b], sampling, a) for a, b in ranges]
    busy = [i for i, (a, b) in enumerate(ranges) if b > a]
    async with state.gate.admit() as aborted:
        futures = state.pool.submit_all(jobs)

        async def gone() -> bool:
            return aborted() or await request.is_disconnected()

        try:
            replies = await state.pool.gather([futures[i] for i in busy], gone)
        except ReplicaDied as exc:
            raise ApiError(503, str(exc)) from None
        except ClientGone as exc:
            if aborted():
                raise ApiError(503, "aborted by /pause?mode=abort: send it again (it waits for /resume)") from None
            raise ApiError(499, str(exc)) from None
    failed = [r for r in replies if isinstance(r, JobFailed)]
    if failed:
        raise ApiError(failed[0].status, failed[0].message)
    results = [res for r in replies if isinstance(r, GenerateResult) for res in r.results]
    versions = {r.weight_version for r in replies if isinstance(r, GenerateResult)}
    if len(versions) > 1:
        raise ApiError(503, f"replicas disagree on the weight version {sorted(versions)}: resync weights")
    return GenerateResult(results, versions.pop())


async def _generate(state: ServerState, prompt_ids: list[list[int]], images: list[list[str]],
                    sampling: SamplingSpec, request: Request) -> Response:
    result = await run_generate(state, prompt_ids, images, sampling, request)
    return Response(result.to_json(), media_type="application/json")


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own included, is ``{"error": "<one line>"}``."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:  # 404, 405, ...
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        status = 400 if err.get("type") == "json_invalid" else 422
        msg = str(err.get("msg")).removeprefix("Value error, ")
        return error_response(status, f"{where}: {msg}" if where else msg)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # still logged with its traceback
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app over a started pool."""
    # With a key, the API schema (it lists the weight routes) needs the key too, and the browser
    # pages that load it without one (/docs, /redoc) are off.
    keyed = {"openapi_url": None, "docs_url": None, "redoc_url": None} if state.api_key else {}
    app = FastAPI(title="vroll generation server", version="0.1.0", **keyed)
    app.state.vroll = state
    app.add_middleware(BodyLimit, max_bytes=state.max_request_bytes)
    app.add_middleware(KeyCheck, api_key=state.api_key)  # added last, runs first: no key, no body read
    _install_error_handlers(app)
    _add_generation_routes(app, state)
    _add_weight_routes(app, state)
    if state.api_key:
        @app.get("/openapi.json", dependencies=[Depends(api_key_check(state.api_key))], include_in_schema=False)
        async def openapi() -> dict[str, Any]:
            return app.openapi()
    return app


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    auth = [Depends(api_key_check(state.api_key))]

    @app.api_route("/health", methods=["GET", "HEAD"], response_model=HealthResponse)
    async def health() -> JSONResponse:
        replicas = [f"{r.index}: {r.status.state}" + (f" ({r.status.reason})" if r.status.reason else "")
                    for r in state.pool.replicas]
        ok = state.pool.healthy and state.info is not None
        dead = any(r.status.state in ("dead", "restarting") for r in state.pool.replicas)
        status = "ok" if ok else ("unhealthy" if dead else "starting")
        body = HealthResponse(status=status, replicas=replicas).model_dump()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/info", response_model=InfoResponse, dependencies=auth)
    async def info() -> InfoResponse:
        i = state.ready_info()
        version = state.weights.weight_version if state.weights else 0
        return InfoResponse(model=i.model, dtype=i.dtype, max_model_len=i.max_model_len,
                            tensor_parallel_size=state.tp, data_parallel_size=state.dp,
                            vllm_version=i.vllm_version, device=i.device, gpu_uuids=list(i.gpu_uuids),
                            weight_version=version, takes_images=i.max_images_per_prompt > 0,
                            max_images_per_prompt=i.max_images_per_prompt, max_image_pixels=state.max_image_pixels,
                            max_request_bytes=state.max_request_bytes,
                            max_request_tokens=state.limits.max_request_tokens,
                            max_prompts_per_request=state.limits.max_prompts, max_lora_rank=i.max_lora_rank)

    @app.post("/generate", response_model=GenerateResult, dependencies=auth)
    async def generate(req: GenerateRequest, request: Request) -> Response:
        info = state.ready_info()  # 503 before any tokenizing
        if req.images is not None and len(req.images) != len(req.prompts):
            raise ApiError(400, f"images has {len(req.images)} entries for {len(req.prompts)} prompts: "
                                "give one per prompt (null for a prompt without images)")
        images = req.prompt_images()
        _check_image_counts([len(x) for x in images], info)
        if isinstance(req.prompts[0], str):  # tokenize in a thread: /health stays responsive
            state.limits.check_texts(req.prompts, req, info.max_model_len)  # type: ignore[arg-type]
            ids = await asyncio.to_thread(tokenize, state.tokenizer, req.prompts)  # type: ignore[arg-type]
        else:
            ids = [list(p) for p in req.prompts]  # type: ignore[arg-type]
        return await _generate(state, ids, images, req.sampling(), request)

    @app.post("/chat", response_model=GenerateResult, dependencies=auth)
    async def chat(req: ChatRequest, request: Request) -> Response:
        info = state.ready_info()
        images = [[im for m in conv for im in m.images()] for conv in req.messages]
        _check_image_counts([len(x) for x in images], info)  # before a text-only template sees image parts
        conversations = [[m.for_template() for m in conv] for conv in req.messages]
        state.limits.check_texts([_chars(conv) for conv in conversations], req, info.max_model_len)
        ids = await asyncio.to_thread(render_chats, state.tokenizer, conversations, req.add_generation_prompt)
        return await _generate(state, ids, images, req.sampling(), request)

    @app.post("/reset_prefix_cache", dependencies=auth)
    async def reset_prefix_cache() -> dict[str, bool]:
        state.ready_info()
        futures = state.pool.submit_all([ResetPrefixCacheJob()] * state.dp)
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        return {"ok": True, "success": True}  # "success": vLLM's reply since 0.26 (TRL's client reads it)


def _chars(conversation: list[dict]) -> str:
    """A conversation's text parts, joined: what its length bound before rendering counts."""
    return "".join(c if isinstance(c, str) else "".join(p.get("text", "") for p in c if isinstance(p, dict))
                   for c in (m.get("content") or "" for m in conversation))


def tokenize(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(prompts).input_ids]


def render_chats(tokenizer: Any, conversations: list[list[dict]], add_generation_prompt: bool,
                 template_kwargs: dict[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each conversation under the chat template (``template_kwargs``: ``tools``,
    ``chat_template`` and the template's own arguments); a template that refuses one is a 400."""
    ids = []
    for i, messages in enumerate(conversations):
        try:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=True, **(template_kwargs or {}))
        except Exception as exc:  # a template that rejects the conversation (roles, order)
            raise ApiError(400, f"chat template failed on conversation {i}: {exc}") from None
        ids.append(list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out))
    return ids


def _add_weight_routes(app: FastAPI, state: ServerState) -> None:
    auth = [Depends(api_key_check(state.api_key))]

    def sessions() -> WeightSessions:
        state.ready_info()
        assert state.weights is not None
        return state.weights

    @app.post("/weights/init", response_model=WeightsInitResponse, dependencies=auth)
    async def weights_init(req: WeightsInitRequest) -> WeightsInitResponse:
        ws = sessions()
        session = await ws.open(req, state.pool.submit_all)
        log.info("trainer session opened for %s:%d (%s)", req.host, req.port, req.backend)
        return WeightsInitResponse(world_size=ws.world_size, trainer_rank=0,
                                   session_id=session.session_id, dtype=ws.dtype)

    @app.post("/weights/update", response_model=WeightsUpdateResponse, dependencies=auth)
    async def weights_update(req: WeightsUpdateRequest) -> WeightsUpdateResponse:
        update = await sessions().start_update(req, state.pool.submit_all)
        return WeightsUpdateResponse(update_id=update.update_id, num_buckets=len(update.plan),
                                     num_bytes=sum(b.nbytes for b in update.plan))

    @app.get("/weights/update/{update_id}", response_model=WeightsUpdateStatus, dependencies=auth)
    async def weights_status(update_id: int, wait: bool = True,
                             session_id: str = Header("", alias=SESSION_HEADER)) -> WeightsUpdateStatus:
        if not wait:  # ?wait=false: the state now (a trainer whose collective stalls asks this)
            state, error = sessions().peek(session_id, update_id)
            return WeightsUpdateStatus(update_id=update_id, state=state, weight_version=sessions().weight_version,
                                       error=error)
        update = await sessions().finish(session_id, update_id)
        return WeightsUpdateStatus(update_id=update_id, state="failed" if update.error else "done",
                                   weight_version=update.weight_version or 0, error=update.error)

    @app.post("/weights/close", dependencies=auth)
    async def weights_close(req: WeightsCloseRequest) -> dict[str, bool]:
        await sessions().close(req.session_id, state.pool.submit_all)
        return {"ok": True}
