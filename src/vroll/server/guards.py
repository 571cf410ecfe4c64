"""What a request must pass before the server does any work for it, in the order it is checked:

1. the API key (:class:`KeyCheck`), before the body is read: a client without the key learns
   nothing about the API, and costs no parsing;
2. the body's size (:class:`BodyLimit`), before it is parsed;
3. the work it asks for (:class:`RequestLimits`): the prompt count, and ``n x (prompt +
   max_tokens)`` tokens (``vroll.batching.request_work``). Text prompts are bounded by their
   length before they are tokenized, and counted exactly after.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vroll.batching import request_work
from vroll.protocol import SamplingSpec
from vroll.server.errors import ApiError

DEFAULT_MAX_REQUEST_TOKENS = 2**24
DEFAULT_MAX_PROMPTS = 16_384
OPEN_PATHS = frozenset({"/health"})  # answered without the key: a load balancer's probe


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body: ``{"error": "<one line>"}``."""
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


def key_matches(authorization: str, api_key: str) -> bool:
    """``Authorization: Bearer <key>``, the scheme in any case (RFC 9110), the key compared in constant time."""
    scheme, _, given = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def api_key_check(api_key: str | None):  # noqa: ANN201 - a FastAPI dependency
    """The per-route check of the key (:class:`KeyCheck` has already refused a request without it)."""
    def check(request: Request) -> None:
        if api_key is not None and not key_matches(request.headers.get("authorization", ""), api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
    return check


class KeyCheck:
    """ASGI middleware: without the key, every route but ``/health`` gets 401 before its body is read."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.api_key is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if key_matches(given, self.api_key):
            await self.app(scope, receive, send)
            return
        await error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before anyone parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) <= self.max_bytes:
            await self.app(scope, receive, send)  # the server enforces the declared length
            return
        if length is not None:
            await self._refuse(scope, receive, send)
            return
        body = bytearray()  # chunked: read up to the cap, then replay
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            body += msg.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not msg.get("more_body"):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, f"request body over {self.max_bytes} bytes; send fewer or shorter prompts "
                                  "(or start the server with a larger --max-request-bytes)")(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # later messages: the disconnect
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replay


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` spells (byte-level BPE: one character per byte), so a
    text of L characters is at least L / this many tokens: a bound on its length known before tokenizing."""
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


@dataclass(frozen=True)
class RequestLimits:
    """The work one request may ask for (``--max-request-tokens``, ``--max-prompts-per-request``)."""

    # 2**24 tokens is 1,024 sequences of 16K, a large RL step (vroll's trainer splits a larger one); the
    # repro of issue 25 asked for 52M from a 2 KB body
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS
    max_prompts: int = DEFAULT_MAX_PROMPTS
    token_chars: int = 1  # :func:`longest_token_chars` of the served tokenizer

    def check_count(self, count: int) -> None:
        if count > self.max_prompts:
            raise ApiError(413, f"{count} prompts in one request; this server takes at most {self.max_prompts} "
                                "(--max-prompts-per-request): send them in several requests")

    def check_texts(self, texts: Sequence[str], sampling: SamplingSpec, max_model_len: int) -> None:
        """Before tokenizing: a text too long for the context whatever its tokens, or texts whose work is
        over the cap even at the fewest tokens they can have."""
        self.check_count(len(texts))
        fewest = [len(t) // self.token_chars for t in texts]
        for i, tokens in enumerate(fewest):
            if tokens >= max_model_len:
                raise ApiError(400, f"prompt {i} has {len(texts[i])} characters, at least {tokens} tokens; the "
                                    f"context is {max_model_len} tokens (max_model_len)")
        self.check_work(fewest, sampling, at_least=True)

    def check_work(self, prompt_lengths: Sequence[int], sampling: SamplingSpec, at_least: bool = False) -> None:
        """The work cap (callers check the prompt count first, with :meth:`check_count`)."""
        work = request_work(prompt_lengths, sampling.n, sampling.max_tokens)
        if work > self.max_request_tokens:
            raise ApiError(413, f"this request asks for {'at least ' if at_least else ''}{work:,} tokens of work: "
                                f"{len(prompt_lengths)} prompts x n={sampling.n} x (prompt tokens + max_tokens="
                                f"{sampling.max_tokens}); this server takes at most {self.max_request_tokens:,} "
                                "per request (--max-request-tokens): split it, or ask for fewer tokens")
