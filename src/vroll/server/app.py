"""The HTTP API (FastAPI). Routes only: the work happens in the pool and the replicas."""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from vroll.protocol import (
    SESSION_HEADER,
    ChatRequest,
    CompletionOut,
    EngineInfo,
    GenerateJob,
    GenerateRequest,
    GenerateResponse,
    GenerateResult,
    HealthResponse,
    InfoResponse,
    JobFailed,
    PromptOut,
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


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) ranges of ``n`` items over ``parts`` as even as possible."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _check_lengths(prompt_ids: list[list[int]], max_model_len: int, vocab: int) -> None:
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= max_model_len:
            raise ApiError(400, f"prompt {i} has {len(ids)} tokens; the context is {max_model_len} "
                                "tokens (max_model_len), which must hold the prompt and at least one "
                                "completion token")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt {i} has token id {bad}, outside the vocabulary [0, {vocab})")


async def _generate(state: ServerState, prompt_ids: list[list[int]], sampling: SamplingSpec,
                    request: Request) -> GenerateResponse:
    info = state.ready_info()
    _check_lengths(prompt_ids, info.max_model_len, len(state.tokenizer))
    ranges = _split(len(prompt_ids), state.dp)
    jobs = [GenerateJob(prompt_ids[a:b], sampling, a) for a, b in ranges]
    busy = [i for i, (a, b) in enumerate(ranges) if b > a]
    futures = state.pool.submit_all(jobs)
    try:
        replies = await state.pool.gather([futures[i] for i in busy], request.is_disconnected)
    except ReplicaDied as exc:
        raise ApiError(503, str(exc)) from None
    except ClientGone as exc:
        raise ApiError(499, str(exc)) from None
    failed = [r for r in replies if isinstance(r, JobFailed)]
    if failed:
        raise ApiError(failed[0].status, failed[0].message)
    results = [res for r in replies if isinstance(r, GenerateResult) for res in r.results]
    versions = {r.weight_version for r in replies if isinstance(r, GenerateResult)}
    if len(versions) > 1:
        raise ApiError(503, f"replicas disagree on the weight version {sorted(versions)}: resync weights")
    return GenerateResponse(
        results=[PromptOut(prompt_token_ids=r.prompt_token_ids,
                           completions=[CompletionOut(**c.__dict__) for c in r.completions])
                 for r in results],
        weight_version=versions.pop(),
    )


def _auth(state: ServerState):  # noqa: ANN202
    def check(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        status = 400 if err.get("type") == "json_invalid" else 422
        msg = f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
        return JSONResponse({"error": msg}, status_code=status)


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app over a started pool."""
    app = FastAPI(title="vroll generation server", version="0.1.0")
    app.state.vroll = state
    _install_error_handlers(app)
    _add_generation_routes(app, state)
    _add_weight_routes(app, state)
    return app


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    auth = [Depends(_auth(state))]

    @app.get("/health", response_model=HealthResponse)
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
                            weight_version=version)

    @app.post("/generate", response_model=GenerateResponse, dependencies=auth)
    async def generate(req: GenerateRequest, request: Request) -> GenerateResponse:
        if isinstance(req.prompts[0], str):
            ids = [state.tokenizer(p).input_ids for p in req.prompts]  # type: ignore[arg-type]
        else:
            ids = [list(p) for p in req.prompts]  # type: ignore[arg-type]
        return await _generate(state, ids, SamplingSpec.from_fields(req), request)

    @app.post("/chat", response_model=GenerateResponse, dependencies=auth)
    async def chat(req: ChatRequest, request: Request) -> GenerateResponse:
        try:
            ids = [_render_chat(state.tokenizer, [m.model_dump() for m in conv], req.add_generation_prompt)
                   for conv in req.messages]
        except Exception as exc:  # a template that rejects the conversation (roles, order)
            raise ApiError(400, f"chat template failed: {exc}") from None
        return await _generate(state, ids, SamplingSpec.from_fields(req), request)

    @app.post("/reset_prefix_cache", dependencies=auth)
    async def reset_prefix_cache() -> dict[str, bool]:
        state.ready_info()
        futures = state.pool.submit_all([ResetPrefixCacheJob()] * state.dp)
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        return {"ok": True}


def _render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return list(ids)


def _add_weight_routes(app: FastAPI, state: ServerState) -> None:
    auth = [Depends(_auth(state))]

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
    async def weights_status(update_id: int,
                             session_id: str = Header("", alias=SESSION_HEADER)) -> WeightsUpdateStatus:
        update = await sessions().finish(session_id, update_id)
        return WeightsUpdateStatus(update_id=update_id, state="failed" if update.error else "done",
                                   weight_version=update.weight_version or 0, error=update.error)

    @app.post("/weights/close", dependencies=auth)
    async def weights_close(req: WeightsCloseRequest) -> dict[str, bool]:
        await sessions().close(req.session_id, state.pool.submit_all)
        return {"ok": True}
