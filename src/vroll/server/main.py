"""``vroll serve``: start the replicas, serve HTTP, stop everything on exit."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from vroll.models import takes_images
from vroll.server.app import ServerState, build_app
from vroll.server.checkpoint import checkpoint_tensors
from vroll.server.config import ServeConfig
from vroll.server.connections import guarded_protocol
from vroll.server.guards import RequestLimits, longest_token_chars
from vroll.server.pool import ReplicaPool, device_slices
from vroll.server.trl_routes import add_trl_routes
from vroll.server.weights import WeightSessions

log = logging.getLogger("vroll.server")


class _Server(uvicorn.Server):
    """uvicorn, minus re-raising SIGINT/SIGTERM at exit: we stop the replicas first."""

    pool: ReplicaPool | None = None

    def handle_exit(self, sig: int, frame: object) -> None:
        # Waiting clients get a JSON 503 now, rather than a dropped connection after the grace period.
        if self.pool is not None:
            self.pool.fail_waiting("the server is shutting down")
        super().handle_exit(sig, frame)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise SystemExit(f"vroll serve: cannot listen on {host}:{port}: {exc.strerror}; "
                         "pick another --port (0 picks a free one)") from None
    return sock


def _watch_startup(state: ServerState, cfg: ServeConfig, server: uvicorn.Server, url: str) -> None:
    """Wait for the replicas; on failure, stop the HTTP server so the command exits non-zero."""
    try:
        infos = state.pool.wait_ready(cfg.startup_timeout_s)
    except Exception as exc:
        if server.should_exit:  # stopped on request while starting: not a failure to report
            return
        log.error("%s", exc)
        state.startup_error = str(exc)
        server.should_exit = True
        return
    # Every replica's GPUs, so /info tells a trainer which devices it must not share.
    uuids = tuple(u for i in infos for u in i.gpu_uuids)
    info = dataclasses.replace(infos[0], gpu_uuids=uuids)
    state.weights = WeightSessions(cfg.data_parallel_size, cfg.tensor_parallel_size, info.dtype,
                                   info.device, checkpoint_tensors(state.pool.spec.model, cfg.revision))
    state.info = info
    log.info("ready: %s serving %s (%s, max_model_len %d, vLLM %s) with DP=%d x TP=%d",
             url, info.model, info.dtype, info.max_model_len, info.vllm_version,
             cfg.data_parallel_size, cfg.tensor_parallel_size)


def _load_tokenizer(model: str, revision: str | None) -> Any | None:
    """The model's tokenizer, or ``None`` after one line on stderr saying why it cannot be loaded
    (a missing folder, an unknown Hub id without network): before any port or replica is taken."""
    from transformers import AutoTokenizer

    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().is_dir():
        print(f"vroll serve: cannot load model {model!r}: no such folder", file=sys.stderr)
        return None
    try:
        return AutoTokenizer.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"vroll serve: cannot load model {model!r}: {reason}", file=sys.stderr)
        return None


def serve(cfg: ServeConfig) -> int:
    """Run the server until Ctrl-C/SIGTERM; returns the process exit code."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not _is_loopback(cfg.host) and not cfg.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can "
                    "generate AND overwrite the model's weights; set --api-key or VROLL_API_KEY",
                    cfg.host)
    slices = device_slices(cfg.data_parallel_size, cfg.tensor_parallel_size)
    on_cpu = "VLLM_CPU_OMP_THREADS_BIND" in slices[0].env
    spec = cfg.engine_spec(on_cpu)
    tokenizer = _load_tokenizer(spec.model, cfg.revision)
    if tokenizer is None:
        return 2
    sock = _bind(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    url = f"http://{cfg.host}:{port}"
    pool = ReplicaPool(spec, cfg.data_parallel_size, cfg.log_level)
    state = ServerState(pool, tokenizer, cfg.api_key, cfg.data_parallel_size, cfg.tensor_parallel_size,
                        max_request_bytes=cfg.request_bytes(takes_images(spec.model, cfg.revision)),
                        max_image_pixels=cfg.max_image_pixels,
                        limits=RequestLimits(cfg.max_request_tokens, cfg.max_prompts_per_request,
                                             longest_token_chars(tokenizer)))
    app = build_app(state)
    add_trl_routes(app, state)  # vLLM's routes, as TRL's VLLMClient calls them
    server = _Server(uvicorn.Config(app, http=guarded_protocol(cfg.connection_limits()),
                                    log_level=cfg.log_level.lower(), timeout_graceful_shutdown=5))
    server.pool = pool
    # Our handlers from before the first replica starts: a Ctrl-C or SIGTERM that arrives before
    # uvicorn installs its own (between two lines below) is a request to stop, not a traceback.
    with server.capture_signals():
        try:
            pool.start()
            print(f"vroll serve: listening on {url} (replicas starting; GET /health says when ready)",
                  flush=True)
            threading.Thread(target=_watch_startup, args=(state, cfg, server, url), daemon=True).start()
            server.run(sockets=[sock])
        finally:
            log.info("stopping %d replica(s)", len(pool.replicas))
            pool.shutdown()
    if state.startup_error:
        print(f"vroll serve: {state.startup_error}", file=sys.stderr)
        return 1
    return 0
