"""``GenerationClient``: the trainer's (and anyone's) way to talk to ``vroll serve``.

Every call has a timeout; connection errors and 503s (replicas starting or
restarting) are retried with backoff, nothing else is: a 4xx is the caller's bug
and is raised at once with the server's one-line reason. A connection lost in any
other way (reset mid-answer) is :class:`ServerUnavailable` at once, as a timeout is.

A batch over the server's work cap (``/info``: ``max_request_tokens``, ``max_prompts_per_request``)
goes as several requests, sent at once, each continuing the batch's seeds: the completions are
those one request would have given.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from pydantic import ValidationError

from vroll.batching import prompt_seed, split_by_budget
from vroll.protocol import (
    SESSION_HEADER,
    Bucket,
    BucketSpec,
    GenerateResult,
    InfoResponse,
    LoraSpec,
    PromptInput,
    SamplingSpec,
    WeightsCloseRequest,
    WeightsInitResponse,
    WeightsUpdateRequest,
    WeightsUpdateResponse,
    WeightsUpdateStatus,
)


class ServerError(RuntimeError):
    """The server answered with an error status; ``status`` and its reason are kept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.reason = message


class ServerUnavailable(ServerError):
    """No answer (or only 503s) within the allowed time."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message)


class GenerationClient:
    """Client of a ``vroll serve`` server.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer``; defaults to none.
        timeout: seconds for one call (generation of a large batch can take minutes).
        control_timeout: seconds for calls a live server answers at once (``/info``, opening,
            announcing and closing a weight sync): a hung host costs this, not ``timeout``.
        connect_timeout: seconds to open a connection.
        retries: extra attempts after a connection error or a 503.
        transport: an ``httpx`` transport (tests: ``httpx.MockTransport``); default: the network.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 600.0, connect_timeout: float = 5.0, retries: int = 3,
                 transport: httpx.BaseTransport | None = None, control_timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.control_timeout = control_timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=connect_timeout), transport=transport)
        self.retries = retries
        self._caps: tuple[int, int] | None = None  # the server's (max_request_tokens, max_prompts_per_request)

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None, **send: Any) -> Any:
        return self._send(method, path, body, headers, **send).json()

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None, params: dict[str, Any] | None = None,
              timeout: float | None = None) -> httpx.Response:
        delay = 0.5
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.request(method, path, json=body, headers=headers, params=params, **extra)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
                if attempt == self.retries:
                    raise ServerUnavailable(f"cannot reach {self.base_url}{path}: {exc}") from None
            except httpx.TimeoutException:
                raise ServerUnavailable(f"{method} {path} timed out after "
                                        f"{timeout or self._http.timeout.read} s") from None
            except httpx.TransportError as exc:  # e.g. the connection reset mid-answer: the server died
                raise ServerUnavailable(f"{method} {self.base_url}{path}: connection lost ({exc!r})") from None
            else:
                if resp.status_code < 400:
                    return resp
                reason = _reason(resp)
                if resp.status_code != 503 or attempt == self.retries:
                    raise ServerError(resp.status_code, reason)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def wait_until_ready(self, timeout: float = 300.0, poll: float = 1.0) -> None:
        """Block until ``/health`` says every replica is ready, or raise with a hint."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                resp = self._http.get("/health", timeout=min(5.0, poll + 4))
                if resp.status_code == 200:
                    return
                last = _reason(resp)
                if '"unhealthy"' in resp.text:
                    raise ServerUnavailable(f"server at {self.base_url} is unhealthy: {resp.text}")
            except httpx.TransportError as exc:
                last = str(exc) or type(exc).__name__
            time.sleep(poll)
        raise ServerUnavailable(
            f"no ready vroll server at {self.base_url} after {timeout:.0f} s ({last}). "
            f"Start one with:  vroll serve --model <model> --port {httpx.URL(self.base_url).port}")

    def is_ready(self, timeout: float = 2.0) -> bool:
        """One ``/health`` call: whether every replica is ready now (False on no answer within ``timeout``)."""
        try:
            return self._http.get("/health", timeout=timeout).status_code == 200
        except httpx.TransportError:
            return False

    # ------------------------------------------------------------------ generation

    def info(self) -> InfoResponse:
        """Model, dtype, context length, parallelism, vLLM version, weight version."""
        return InfoResponse.model_validate(self._request("GET", "/info", timeout=self.control_timeout))

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]] | Sequence[PromptInput],
                 sampling: SamplingSpec | None = None, *, images: Sequence[Any] | None = None,
                 **fields: Any) -> GenerateResult:
        """``sampling.n`` completions for each prompt (texts, token-id lists or :class:`PromptInput`).

        Pass a :class:`SamplingSpec`, or its fields as keywords (``n=4, temperature=1.0``);
        a non-finite logprob comes back as NaN (the server sends null: JSON has no NaN).
        Images (PIL, sent as base64 PNG): a ``PromptInput`` carries its own; for texts or
        token ids, ``images`` gives one entry per prompt (an image, a list of images, or None).
        Each image fills one placeholder of its prompt (Qwen2-VL: ``<|image_pad|>``); the
        result's ``prompt_token_ids`` have every placeholder expanded, as the model ran them.
        """
        items = list(prompts)
        if items and isinstance(items[0], PromptInput):
            if images is not None:
                raise TypeError("PromptInput prompts carry their images; do not pass images= too")
            images = [p.images or None for p in items]  # type: ignore[union-attr]
            items = [p.token_ids for p in items]  # type: ignore[union-attr]
        prompts_json = [p if isinstance(p, str) else list(p) for p in items]
        encoded = None
        if images is not None and any(im is not None and im != () and im != [] for im in images):
            encoded = [_encode_images(im) for im in images]
        spec = _spec(sampling, fields)
        parts = self._parts(prompts_json, spec)
        if len(parts) == 1:
            return self._generate("/generate", _body(prompts_json, encoded, 0, len(items)), spec)
        with ThreadPoolExecutor(min(len(parts), 8), thread_name_prefix="vroll-generate") as threads:
            outs = list(threads.map(lambda ab: self._generate(
                "/generate", _body(prompts_json, encoded, *ab), shifted(spec, ab[0])), parts))
        # one weight version per result: the oldest any part used (a push between parts is counted stale)
        return GenerateResult([r for out in outs for r in out.results], min(out.weight_version for out in outs))

    def _parts(self, prompts: list[str | list[int]], spec: SamplingSpec) -> list[tuple[int, int]]:
        """The request ranges that fit the server's caps (a text counts its UTF-8 bytes: no fewer tokens)."""
        if len(prompts) <= 1:
            return [(0, len(prompts))]  # nothing to split: the server's answer says what is wrong, if anything
        if self._caps is None:
            info = self.info()
            self._caps = (info.max_request_tokens, info.max_prompts_per_request)  # 0 and 0: an older server
        lengths = [len(p.encode()) + 2 if isinstance(p, str) else len(p) for p in prompts]
        return split_by_budget(lengths, spec.n, spec.max_tokens, *self._caps) or [(0, len(prompts))]

    def chat(self, conversations: Sequence[Sequence[dict[str, Any]]], sampling: SamplingSpec | None = None,
             **fields: Any) -> GenerateResult:
        """Like :meth:`generate`, for conversations rendered with the model's chat template.

        A message's ``content`` may be a list of parts: ``{"type": "text", "text": ...}`` and
        ``{"type": "image", "image": <PIL image or base64>}`` (or OpenAI's ``image_url`` part).
        """
        body = {"messages": [[_encode_message(m) for m in c] for c in conversations]}
        return self._generate("/chat", body, _spec(sampling, fields))

    def _generate(self, path: str, body: dict[str, Any], sampling: SamplingSpec) -> GenerateResult:
        resp = self._send("POST", path, {**body, **sampling.model_dump(mode="json")})
        try:
            return GenerateResult.from_json(resp.content)
        except ValidationError as exc:  # not a vroll server, or another version of it
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ServerError(resp.status_code, f"unexpected answer from {path}: {where}: {err['msg']}") from None

    def reset_prefix_cache(self) -> None:
        self._request("POST", "/reset_prefix_cache")

    # ------------------------------------------------------------------ weight sync (low level)

    def weights_init(self, host: str, port: int, backend: str, timeout_s: float,
                     force: bool = False) -> WeightsInitResponse:
        body = dict(host=host, port=port, backend=backend, timeout_s=timeout_s, force=force)
        return WeightsInitResponse.model_validate(
            self._request("POST", "/weights/init", body, timeout=self.control_timeout))

    def weights_update(self, session_id: str, buckets: Sequence[Bucket], atomic: bool = True,
                       allow_partial_layers: bool = False, lora: dict | None = None) -> WeightsUpdateResponse:
        """Announce one sync's bucket plan; the bytes follow over the process group. ``lora``: the buckets
        are a LoRA adapter with this config (``LoraSpec``'s fields)."""
        req = WeightsUpdateRequest(session_id=session_id, buckets=[BucketSpec.from_bucket(b) for b in buckets],
                                   atomic=atomic, allow_partial_layers=allow_partial_layers,
                                   lora=None if lora is None else LoraSpec(**lora))
        return WeightsUpdateResponse.model_validate(
            self._request("POST", "/weights/update", req.model_dump(), timeout=self.control_timeout))

    def weights_status(self, session_id: str, update_id: int, wait: bool = True,
                       timeout: float | None = None) -> WeightsUpdateStatus:
        """Wait until every replica has loaded update ``update_id`` (or failed); ``wait=False``: its
        state now (``running`` while the bytes move or the replicas load them), within ``timeout``
        (default ``control_timeout``)."""
        params, default = (None, None) if wait else ({"wait": "false"}, self.control_timeout)
        return WeightsUpdateStatus.model_validate(self._request(
            "GET", f"/weights/update/{update_id}", headers={SESSION_HEADER: session_id}, params=params,
            timeout=timeout or default))

    def weights_close(self, session_id: str) -> None:
        self._request("POST", "/weights/close", WeightsCloseRequest(session_id=session_id).model_dump(),
                      timeout=self.control_timeout)


def shifted(sampling: SamplingSpec, offset: int) -> SamplingSpec:
    """The sampling of a batch's prompts from ``offset`` on: their seeds continue the batch's (``prompt_seed``)."""
    if sampling.seed is None or offset == 0:
        return sampling
    return sampling.model_copy(update={"seed": prompt_seed(sampling.seed, offset)})  # the server checks the range


def _body(prompts: list[str | list[int]], images: list[Any] | None, start: int, stop: int) -> dict[str, Any]:
    body: dict[str, Any] = {"prompts": prompts[start:stop]}
    if images is not None:
        body["images"] = images[start:stop]
    return body


def _spec(sampling: SamplingSpec | None, fields: dict[str, Any]) -> SamplingSpec:
    if sampling is not None and fields:
        raise TypeError(f"pass a SamplingSpec or its fields as keywords, not both (got {sorted(fields)})")
    return sampling if sampling is not None else SamplingSpec(**fields)


def encode_image(image: Any) -> str:
    """An image as base64 for the wire: a PIL image becomes PNG; a string is taken as already encoded."""
    if isinstance(image, str):
        return image
    if isinstance(image, bytes | bytearray):
        return base64.b64encode(bytes(image)).decode("ascii")
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # lossless (the trainer's pixels), fast (every step)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _encode_images(images: Any) -> list[str] | None:
    if images is None:
        return None
    if isinstance(images, list | tuple):
        return [encode_image(im) for im in images] or None
    return [encode_image(images)]


def _encode_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    parts = [{**part, "image": encode_image(part["image"])} if part.get("type") == "image" and "image" in part
             else part for part in content]
    return {**message, "content": parts}


def _reason(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error") or resp.json())
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
