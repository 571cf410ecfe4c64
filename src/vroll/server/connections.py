"""Bounds on connections that uvicorn does not set, in the HTTP protocol itself (below the ASGI app).

uvicorn closes a keep-alive connection left idle after a response, but nothing else: a client that
connects and says nothing, sends half a request head, or half a body and then falls silent, holds a
file descriptor (and, mid-body, a request handler) for as long as it likes. Issue 25's probe left 801
such connections open for as long as it watched. Here:

- a request's head and body must arrive within ``read_timeout_s`` of its first byte (or of the
  connection, for the first request): else a JSON 408 and the connection is closed, and a handler
  waiting for the rest of the body sees the client gone;
- at most ``max_connections`` are open at once: one more gets a JSON 503 and is closed at once;
- a request that is not HTTP/1.1 gets a JSON 400 (``{"error": ...}``, like every other error of the
  server), not uvicorn's text/plain one.

uvicorn's h11 protocol is the base (pure Python, and its hooks are methods): the request rate of an
RL server is far below what it parses.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_READ_TIMEOUT_S = 60.0  # a 256 MiB image batch at ~40 Mbit/s; a loopback trainer needs milliseconds
DEFAULT_MAX_CONNECTIONS = 1000


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a request may take to arrive, and how many connections may be open at once."""

    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS


def raw_json_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, written past h11 (whose state may be mid-request)."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read deadline per request, a connection cap and JSON 400s."""

    limits = ConnectionLimits()
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "Service Unavailable", f"too many open connections (the server takes "
                                                     f"{self.limits.max_connections}); try again later")
            return
        self._arm()  # the first request's head is due, even if no byte ever comes

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the whole request is in (or the connection is done)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "Bad Request", "malformed HTTP/1.1 request")

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        cycle: Any = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # the app answered before reading it all: its answer stands
                return
            cycle.disconnected = True  # the handler waiting for the body sees the client gone, and sends nothing
            cycle.message_event.set()
        self._refuse(408, "Request Timeout", f"the request did not arrive within {self.limits.read_timeout_s:g} s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(raw_json_response(status, reason, message))
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, with these limits (uvicorn builds it per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
