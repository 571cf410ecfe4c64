"""Connection bounds (issue 25, item 4) on a real uvicorn over real sockets: ``vroll serve``'s protocol class
(``vroll.server.connections``) in front of a small ASGI app that reads the whole body, as the server's
routes do. Each check runs against uvicorn's own h11 protocol too (the negative control: it keeps the
connections open, and answers malformed HTTP in text/plain)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vroll.server.connections import ConnectionLimits, guarded_protocol

TIMEOUT_S = 0.5
LIMITS = ConnectionLimits(read_timeout_s=TIMEOUT_S, max_connections=20)


def echo_app(gone: list[str]):
    """An app that reads the whole body, then answers its length; notes (in ``gone``) a request whose client
    went away mid-body, as a handler waiting for the rest sees it."""
    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.append(scope["path"])
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = json.dumps({"bytes": size}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
    return app


class Served:
    def __init__(self, http: type) -> None:
        self.gone: list[str] = []
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(echo_app(self.gone), http=http, log_level="critical", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True)
        self.thread.start()
        assert self._wait_up()

    def _wait_up(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self.server.started:
            time.sleep(0.02)
        return self.server.started

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(params=["guarded", "uvicorn"])
def served(request) -> Iterator[Served]:
    http = guarded_protocol(LIMITS) if request.param == "guarded" else H11Protocol
    s = Served(http)
    s.guarded = request.param == "guarded"
    yield s
    s.stop()


def closed_by_server(socks: list[socket.socket], within_s: float) -> list[tuple[bool, bytes]]:
    """For each socket: whether the server closed it within ``within_s`` seconds (one deadline for all), and
    what it said before."""
    deadline = time.monotonic() + within_s
    outcomes = []
    for sock in socks:
        data, closed = b"", False
        try:
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                data += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
        outcomes.append((closed, data))
    return outcomes


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """One whole response (its head, then content-length bytes): status and JSON body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body)


def status_and_body(data: bytes) -> tuple[int, dict]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("sent", [b"", b"POST /x HTTP/1.1\r\nhost: a\r\n",
                                  b"POST /body HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\nhalf"],
                         ids=["nothing", "half-head", "half-body"])
def test_a_request_that_stops_arriving_is_answered_408_and_closed(served, sent):
    socks = [served.connect() for _ in range(10)]
    for s in socks:
        s.sendall(sent)
    outcomes = closed_by_server(socks, TIMEOUT_S + 1.5)
    if not served.guarded:  # uvicorn alone keeps every one open
        assert not any(closed for closed, _ in outcomes)
        return
    assert all(closed for closed, _ in outcomes)
    for _, data in outcomes:
        status, body = status_and_body(data)
        assert status == 408 and f"did not arrive within {TIMEOUT_S:g} s" in body["error"]
    if b"content-length" in sent:  # the handlers waiting for the rest of the body were let go
        assert served.gone == ["/body"] * len(socks)


def test_a_slow_but_steady_client_is_not_cut_off_before_the_deadline(served):
    """The deadline runs from the request's first byte: a request that completes in time is served."""
    s = served.connect()
    s.sendall(b"POST /slow HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\n\r\nab")
    time.sleep(TIMEOUT_S / 2)
    s.sendall(b"cd")
    assert read_response(s) == (200, {"bytes": 4})
    # kept alive: the next request on it gets its own deadline
    time.sleep(TIMEOUT_S * 1.5)
    s.sendall(b"GET /again HTTP/1.1\r\nhost: a\r\n\r\n")
    assert read_response(s) == (200, {"bytes": 0})


def test_malformed_http_is_answered_in_json(served):
    s = served.connect()
    s.sendall(b"GARBAGE\x00 / NOT-HTTP\r\n\r\n")
    [(closed, data)] = closed_by_server([s], 5.0)
    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400"
    if served.guarded:
        assert json.loads(body) == {"error": "malformed HTTP/1.1 request"}
    else:
        assert b"text/plain" in head


def test_connections_over_the_cap_get_503_and_are_closed(served):
    held = [served.connect() for _ in range(LIMITS.max_connections)]
    time.sleep(0.2)
    extra = served.connect()
    [(closed, data)] = closed_by_server([extra], 1.0)
    if served.guarded:
        assert closed
        status, body = status_and_body(data)
        assert status == 503 and "too many open connections" in body["error"]
        for s in held:
            s.close()
        time.sleep(0.2)
        again = served.connect()  # the cap counts open connections: closing them frees room
        again.sendall(b"GET /ok HTTP/1.1\r\nhost: a\r\n\r\n")
        assert read_response(again)[0] == 200
    else:
        assert not closed
