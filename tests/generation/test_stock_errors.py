"""The stock-vLLM path's clear errors, against a fake server that answers as a misconfigured or hung ``vllm serve``
would (the real server's own cases are in test_stock_vllm.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from vroll.batching import UNKNOWN_VERSION
from vroll.generation.stock import StockServerGenerator, completion, version_number
from vroll.weightsync.group import join_store, make_group
from vroll.weightsync.sender import WeightSyncConfig, WeightSyncError

MODEL = "/models/policy"
Route = Callable[[dict[str, Any]], tuple[int, dict[str, Any]]]


class FakeServer:
    """An HTTP server whose routes are ``{path: fn(body) -> (status, json)}``; unknown paths are 404."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.release = threading.Event()  # set at the end: handlers told to hang return
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                route = fake.routes.get(self.path.split("?")[0])
                status, answer = route(body) if route else (404, {"detail": "Not Found"})
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a hung route, as it should

            do_GET = do_POST = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def hang(self) -> tuple[int, dict[str, Any]]:
        self.release.wait(60)
        return 503, {"error": "released"}

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(answer: dict[str, Any] | None = None) -> Route:
    return lambda body: (200, answer or {})


def stock_routes() -> dict[str, Route]:
    """What a correctly started stock server answers at start (its weight-transfer init is per test)."""
    return {"/health": ok(), "/v1/models": ok({"data": [{"id": MODEL, "root": MODEL}]}),
            "/weight_info": ok({"weight_version": "default"}), "/get_world_size": ok({"world_size": 1}),
            "/inference/v1/generate": lambda body: (400, {"error": "token_ids: field required"})}


@pytest.fixture
def fake() -> Iterator[Callable[[dict[str, Route]], FakeServer]]:
    servers: list[FakeServer] = []

    def make(routes: dict[str, Route]) -> FakeServer:
        servers.append(FakeServer(routes))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def connect(server: FakeServer, timeout_s: float = 30.0) -> StockServerGenerator:
    return StockServerGenerator(server.url, None, 5, WeightSyncConfig(timeout_s=timeout_s), MODEL)


def test_a_server_without_dev_mode_is_refused_naming_the_variable(fake):
    routes = stock_routes()
    del routes["/weight_info"]
    with pytest.raises(ValueError, match="VLLM_SERVER_DEV_MODE=1"):
        connect(fake(routes))


def test_a_server_without_the_token_route_is_refused_naming_enable_scale_out(fake):
    routes = stock_routes() | {"/inference/v1/generate": lambda body: (403, {"error": "Scale-out endpoints are "
                                                                                       "disabled"})}
    with pytest.raises(ValueError, match="--enable-scale-out"):
        connect(fake(routes))


def test_a_pool_of_stock_servers_is_a_clear_error(tmp_path):
    from vroll.trainer.config import GRPOConfig
    from vroll.trainer.generators import stock_generator

    args = GRPOConfig(output_dir=str(tmp_path), vllm_server_base_url=["http://a:1", "http://b:2"],
                      vllm_server_kind="stock")
    with pytest.raises(ValueError, match="a pool of several stock vllm serve servers .* is not supported yet"):
        stock_generator(args, None)


def test_versions_and_a_completion_sampled_by_two_versions_is_refused():
    assert version_number("default") == 0 and version_number("7") == 7 and version_number("x") == UNKNOWN_VERSION
    choice = {"token_ids": [3, 4], "text": "ab", "finish_reason": "length",
              "logprobs": {"content": [{"token_id": 3, "logprob": -0.5}, {"token_id": 4, "logprob": -1.5}]},
              "weight_versions": [{"version": "2", "start": 0, "end": 2}]}
    comp, version = completion(choice, True)
    assert (comp.token_ids, comp.logprobs, version) == ([3, 4], [-0.5, -1.5], 2)
    choice["weight_versions"] = [{"version": "2", "start": 0, "end": 1}, {"version": "3", "start": 1, "end": 2}]
    with pytest.raises(ValueError, match="several weight versions"):
        completion(choice, True)


@pytest.mark.slow  # ~8 s: the stall is found by a /health probe that must time out
def test_a_server_that_hangs_mid_broadcast_fails_the_push_within_seconds(fake):
    """The fake joins the trainer's real gloo group at init, then never receives: its /update_weights and
    /health hang (a stopped server). The push leaves within seconds, naming the cause."""
    groups: list[Any] = []
    server: FakeServer

    def init(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        info = body["init_info"]
        store = join_store(info["master_address"], info["master_port"], info["world_size"], info["timeout_s"])
        groups.append(make_group(store, 1, info["world_size"], "gloo", info["timeout_s"], info["session"]))
        return 200, {}

    def update(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        server.routes["/health"] = lambda body: server.hang()  # from now on nothing answers
        return server.hang()

    server = fake(stock_routes() | {"/init_weight_transfer_engine": init, "/pause": ok(),
                                    "/start_weight_update": ok(), "/update_weights": update})
    gen = connect(server, timeout_s=60)
    model = torch.nn.Linear(512, 512)  # 1 MiB: more than a socket buffer, so the broadcast cannot complete
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="stopped answering mid-push"):
        gen.push_weights(model)
    assert time.monotonic() - start < 20
    gen.close()
