"""vLLM's routes that TRL 1.16's ``VLLMClient`` calls, served by ``vroll serve`` beside its own.

TRL's ``GRPOTrainer(vllm_mode="server")`` (and every TRL trainer with a vLLM server) asks, in order:
``/health``, ``GET /v1/models`` (the model id it then names), ``GET /server_info`` (it needs a
``weight_transfer_config``), ``GET /get_world_size``, ``POST /init_weight_transfer_engine``; then per
step ``POST /v1/completions`` with token-id prompts (``return_token_ids``, ``return_tokens_as_token_ids``,
``logprobs: 0``), and per sync ``/start_weight_update``, ``/update_weights`` (a packed broadcast
beside the request), ``/finish_weight_update``, ``/reset_prefix_cache``. ``VLLMClient.chat`` uses
``POST /v1/chat/completions``. Generation goes through the same checks, batching and replicas as
``/generate``; the weight routes keep vroll's guarantees (``vroll.server.transfer``). TRL's async GRPO
client also calls ``/pause?mode=keep`` and ``/resume`` (``vroll.server.pause``); ``/is_paused``,
``/weight_info`` and ``/shutdown_weight_transfer_engine`` answer as vLLM's do.

Not served, each refused by name: streaming, top-N logprobs (the sampled token's only),
``prompt_logprobs``, structured outputs, tool-call parsing, the unique-id rendezvous, and a
``weight_version`` chosen by the client (vroll counts its loads). Not served at all (404):
``/update_weight_version``, ``/inference/v1/generate`` and ``/v1/chat/completions/render``
(TRL's image-features path), LoRA adapter routes.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse

from vroll.engine.config import LOGPROBS_MODE
from vroll.protocol import (
    SESSION_HEADER,
    ChatCompletionsRequest,
    CompletionsRequest,
    EngineInfo,
    GenerateResult,
    TransferBracketRequest,
    TransferInitRequest,
    TransferUpdateRequest,
)
from vroll.server.app import ServerState, render_chats, run_generate, tokenize
from vroll.server.errors import ApiError
from vroll.server.guards import api_key_check
from vroll.server.pause import PauseMode
from vroll.server.transfer import NativeTransfer
from vroll.server.weights import WeightSessions


def add_trl_routes(app: FastAPI, state: ServerState) -> None:
    """Mount the routes on ``app``; their state (:class:`NativeTransfer`) lives in this closure."""
    transfer = NativeTransfer()
    state.pool.on_restart.append(transfer.replica_restarted)
    _add_info_routes(app, state)
    _add_openai_routes(app, state)
    _add_control_routes(app, state)
    _add_transfer_routes(app, state, transfer)


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    deps = [Depends(api_key_check(state.api_key))]

    @app.get("/v1/models", dependencies=deps)
    async def models() -> dict[str, Any]:
        info = state.ready_info()
        return {"object": "list", "data": [{"id": info.model, "object": "model", "created": 0, "owned_by": "vroll",
                                            "root": info.model, "max_model_len": info.max_model_len}]}

    @app.get("/server_info", dependencies=deps)
    async def server_info(config_format: str = "json") -> dict[str, Any]:
        """The few parts of vLLM's ``VllmConfig`` a client reads (TRL: ``weight_transfer_config``)."""
        info = state.ready_info()
        backend = "gloo" if info.device == "cpu" else "nccl"
        # logprobs_mode: TRL's GRPOTrainer warns unless processed_logprobs; the two are equal at its default
        # sampling (temperature 1, no top-k/top-p/min-p, no penalties), see the README
        return {"vllm_config": {
            "model_config": {"model": info.model, "dtype": info.dtype, "max_model_len": info.max_model_len,
                             "logprobs_mode": LOGPROBS_MODE},
            "parallel_config": {"tensor_parallel_size": state.tp, "data_parallel_size": state.dp},
            "weight_transfer_config": {"backend": backend},
            "lora_config": None,
        }, "server": "vroll", "vllm_version": info.vllm_version}

    @app.get("/get_world_size", dependencies=deps)
    async def world_size() -> dict[str, int]:
        state.ready_info()
        return {"world_size": state.dp * state.tp}


def _add_control_routes(app: FastAPI, state: ServerState) -> None:
    """``/pause``, ``/resume``, ``/is_paused`` (``vroll.server.pause``) and ``/weight_info``."""
    deps = [Depends(api_key_check(state.api_key))]

    @app.post("/pause", dependencies=deps)
    async def pause(mode: PauseMode = Query("abort"), clear_cache: bool = Query(True)) -> dict[str, str]:
        # clear_cache (deprecated in vLLM) changes nothing here: every weight load resets the prefix cache
        state.ready_info()
        await state.gate.pause(mode)
        return {"status": "paused"}

    @app.post("/resume", dependencies=deps)
    async def resume() -> dict[str, str]:
        state.gate.resume()
        return {"status": "resumed"}

    @app.get("/is_paused", dependencies=deps)
    async def is_paused() -> dict[str, bool]:
        return {"is_paused": state.gate.paused}

    @app.get("/weight_info", dependencies=deps)
    async def weight_info() -> dict[str, str]:
        """vLLM's shape (a string); the count of loads since start, as in every generation reply."""
        state.ready_info()
        assert state.weights is not None
        return {"weight_version": str(state.weights.weight_version)}


def _check_model(name: str | None, info: EngineInfo) -> None:
    if name is not None and name != info.model:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {info.model!r} (GET /v1/models)")


def _add_openai_routes(app: FastAPI, state: ServerState) -> None:
    deps = [Depends(api_key_check(state.api_key))]

    @app.post("/v1/completions", dependencies=deps)
    async def completions(req: CompletionsRequest, request: Request) -> JSONResponse:
        info = state.ready_info()
        _check_model(req.model, info)
        prompts = req.prompt_list()
        sampling = req.sampling_spec(logprobs=req.logprobs is not None)
        if isinstance(prompts[0], str):  # bounded before tokenizing, in a thread: /health stays responsive
            state.limits.check_texts(prompts, sampling, info.max_model_len)  # type: ignore[arg-type]
            ids = await asyncio.to_thread(tokenize, state.tokenizer, prompts)  # type: ignore[arg-type]
        else:
            ids = [list(p) for p in prompts]  # type: ignore[arg-type]
        result = await run_generate(state, ids, [[] for _ in ids], sampling, request)
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "stop_reason": None,
                    "logprobs": _completion_logprobs(c.token_ids, c.logprobs, req, state.tokenizer)
                    if req.logprobs is not None else None,
                    **({"token_ids": c.token_ids, "prompt_token_ids": r.prompt_token_ids}
                       if req.return_token_ids else {})}
                   for i, (r, c) in enumerate((r, c) for r in result.results for c in r.completions)]
        return _reply("text_completion", info, result, choices)

    @app.post("/v1/chat/completions", dependencies=deps)
    async def chat_completions(req: ChatCompletionsRequest, request: Request) -> JSONResponse:
        info = state.ready_info()
        _check_model(req.model, info)
        images = [[im for m in req.messages for im in m.images()]]
        conversation = [m.for_template() for m in req.messages]
        ids = render_chats(state.tokenizer, [conversation], req.add_generation_prompt, req.template_kwargs())
        result = await run_generate(state, ids, images, req.sampling_spec(logprobs=req.logprobs), request)
        prompt = result.results[0]
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                    "logprobs": _chat_logprobs(c.token_ids, c.logprobs, req, state.tokenizer) if req.logprobs
                    else None, **({"token_ids": c.token_ids} if req.return_token_ids else {})}
                   for i, c in enumerate(prompt.completions)]
        extra = {"prompt_token_ids": prompt.prompt_token_ids} if req.return_token_ids else {}
        return _reply("chat.completion", info, result, choices, extra)


def _tokens(ids: list[int], req: CompletionsRequest | ChatCompletionsRequest, tokenizer: Any) -> list[str]:
    if req.return_tokens_as_token_ids:
        return [f"token_id:{t}" for t in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x  # JSON has no NaN (a model that produced NaNs)


def _completion_logprobs(ids: list[int], logprobs: list[float], req: CompletionsRequest,
                         tokenizer: Any) -> dict[str, Any]:
    """OpenAI's completions shape; ``top_logprobs`` holds the sampled token (vLLM's with ``logprobs: 0``)."""
    tokens = _tokens(ids, req, tokenizer)
    values = [_finite(x) for x in logprobs]
    top = [{t: v} for t, v in zip(tokens, values, strict=True)]
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": []}


def _chat_logprobs(ids: list[int], logprobs: list[float], req: ChatCompletionsRequest,
                   tokenizer: Any) -> dict[str, Any]:
    tokens = _tokens(ids, req, tokenizer)
    return {"content": [{"token": t, "logprob": _finite(x), "bytes": None, "top_logprobs": []}
                        for t, x in zip(tokens, logprobs, strict=True)]}


def _reply(kind: str, info: EngineInfo, result: GenerateResult, choices: list[dict[str, Any]],
           extra: dict[str, Any] | None = None) -> JSONResponse:
    """The OpenAI envelope, plus ``weight_version``: the one version every choice came from."""
    prompt_tokens = sum(len(r.prompt_token_ids) for r in result.results)
    completion_tokens = sum(len(c.token_ids) for c in result.flat())
    return JSONResponse({
        "id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
        "created": int(time.time()), "model": info.model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "weight_version": result.weight_version, **(extra or {})})


def _add_transfer_routes(app: FastAPI, state: ServerState, transfer: NativeTransfer) -> None:
    deps = [Depends(api_key_check(state.api_key))]

    def sessions() -> WeightSessions:
        state.ready_info()
        assert state.weights is not None
        return state.weights

    def session_id(request: Request, header: str) -> str | None:
        return request.cookies.get(transfer.cookie) or header or None

    @app.post("/init_weight_transfer_engine", dependencies=deps)
    async def init(req: TransferInitRequest) -> JSONResponse:
        ws = sessions()
        session = await transfer.open(ws, req.init_info, state.pool.submit_all)
        response = JSONResponse({"ok": True, "world_size": req.init_info.world_size, "dtype": ws.dtype})
        response.set_cookie(transfer.cookie, session.session_id, httponly=True, samesite="strict")
        return response

    @app.post("/start_weight_update", dependencies=deps)
    async def start(request: Request, _: TransferBracketRequest | None = None,
                    header: str = Header("", alias=SESSION_HEADER)) -> dict[str, bool]:
        await transfer.start(sessions(), session_id(request, header), state.pool.submit_all)
        return {"ok": True}

    @app.post("/update_weights", dependencies=deps)
    async def update(req: TransferUpdateRequest, request: Request,
                     header: str = Header("", alias=SESSION_HEADER)) -> dict[str, int | bool]:
        nbytes = await transfer.receive(sessions(), session_id(request, header), req.update_info,
                                        state.pool.submit_all)
        return {"ok": True, "num_bytes": nbytes}

    @app.post("/finish_weight_update", dependencies=deps)
    async def finish(request: Request, _: TransferBracketRequest | None = None,
                     header: str = Header("", alias=SESSION_HEADER)) -> dict[str, int | bool]:
        version = await transfer.finish(sessions(), session_id(request, header), state.pool.submit_all)
        return {"ok": True, "weight_version": version}

    async def close(request: Request, header: str = Header("", alias=SESSION_HEADER)) -> dict[str, bool]:
        await transfer.close(sessions(), session_id(request, header), state.pool.submit_all)
        return {"ok": True}

    # vLLM's name, and TRL's ``trl vllm-serve`` one
    app.post("/shutdown_weight_transfer_engine", dependencies=deps)(close)
    app.post("/close_communicator", dependencies=deps)(close)
