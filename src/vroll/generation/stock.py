"""``StockServerGenerator``: completions from a *stock* ``vllm serve``, weights pushed through vLLM's native RL API.

The server must be started with the flags that expose what the trainer needs (``STOCK_COMMAND``):
``VLLM_SERVER_DEV_MODE=1`` (vLLM registers its RL routes, ``/pause``, ``/init_weight_transfer_engine``
..., only then), ``--enable-scale-out`` (the token-in/token-out route ``/inference/v1/generate``) and
``--weight-transfer-config`` (an engine to receive weights: ``vroll_gloo`` on CPU, vroll's plugin,
``nccl`` on GPU). Each is checked at start and a missing one is named.

Generation: one ``/inference/v1/generate`` request per prompt, sent at once (vLLM's scheduler batches
them), token ids in, ids + text + each sampled token's logprob out (``logprobs: 0``, vLLM's raw
logprobs by default), ``n`` per prompt, prompt ``i`` seeded ``seed + first_index + i``
(``vroll.batching.prompt_seed``) as ``vroll serve`` seeds it. The same ``Rollout`` comes back.

Weight versions: the server labels every output token with the version of the weights that sampled
it (``weight_versions`` spans). The trainer labels each push with its number
(``/update_weight_version``), and pushes only while the server is paused, so a completion has one
version; one with two is refused (it would mean something else changed the weights mid-generation).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from vroll.batching import UNKNOWN_VERSION, prompt_seed
from vroll.client import ServerUnavailable
from vroll.generation.rollout import Rollout
from vroll.protocol import Completion, GenerateResult, PromptInput, PromptResult, SamplingSpec
from vroll.weightsync.buckets import to_dtype
from vroll.weightsync.native import ENGINE_NAME, NativeWeightSender
from vroll.weightsync.sender import SyncStats, WeightSyncConfig, WeightSyncError

log = logging.getLogger(__name__)

STOCK_COMMAND = ("VLLM_SERVER_DEV_MODE=1 vllm serve <model> --enable-scale-out --weight-transfer-config "
                 f"'{{\"backend\": \"{ENGINE_NAME}\"}}'   (on GPU: '{{\"backend\": \"nccl\"}}')")
GENERATE_ROUTE = "/inference/v1/generate"
MAX_CONCURRENT_REQUESTS = 64  # requests in flight at once; vLLM batches them in its scheduler


def version_number(label: str | None) -> int:
    """The trainer's number of a server weight-version label: vLLM's initial ``"default"`` is 0 (the
    checkpoint the server loaded), a label this trainer set is its push number, anything else unknown."""
    if label is None or label == "default":
        return 0
    return int(label) if label.isdigit() else UNKNOWN_VERSION


def _same_model(trainer_model: str, served: dict[str, Any]) -> bool:
    """The served model is the trainer's: the same id, or the same folder."""
    names = {served.get("id"), served.get("root")}
    if trainer_model in names:
        return True
    mine = Path(trainer_model).expanduser()
    return mine.exists() and any(n and Path(n).exists() and Path(n).resolve() == mine.resolve() for n in names)


def sampling_params(sampling: SamplingSpec, seed: int | None) -> dict[str, Any]:
    """vLLM's ``SamplingParams`` fields for one prompt of a batch."""
    params: dict[str, Any] = {
        "n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
        "min_p": sampling.min_p, "repetition_penalty": sampling.repetition_penalty,
        "max_tokens": sampling.max_tokens, "stop": list(sampling.stop), "ignore_eos": sampling.ignore_eos,
        "detokenize": True,
    }
    if seed is not None:
        params["seed"] = seed
    if sampling.return_logprobs:
        params["logprobs"] = 0  # the sampled token's logprob only
    return params


def completion(choice: dict[str, Any], with_logprobs: bool) -> tuple[Completion, int]:
    """One choice of the token route as vroll's ``Completion``, and the weight version that sampled it."""
    content = (choice.get("logprobs") or {}).get("content") or []
    logprobs = [float(x["logprob"]) if x.get("logprob") is not None else float("nan") for x in content]
    ids = list(choice.get("token_ids") or [])
    if with_logprobs and len(logprobs) != len(ids):
        raise ValueError(f"the server sent {len(logprobs)} logprobs for {len(ids)} tokens")
    spans = choice.get("weight_versions") or []
    versions = {version_number(s.get("version")) for s in spans}
    if len(versions) > 1:
        raise ValueError(f"a completion was sampled by several weight versions {sorted(versions)}: the weights "
                         "changed mid-generation (another trainer pushing to this server?)")
    version = versions.pop() if versions else UNKNOWN_VERSION
    return Completion(ids, choice.get("text") or "", logprobs if with_logprobs else [], choice.get("finish_reason")), \
        version


def _http(url: str, api_key: str | None, timeout: float = 600.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))


def wait_ready(http: httpx.Client, timeout: float) -> None:
    """Until ``/health`` answers 200 (both kinds of server have it), or a clear error after ``timeout``."""
    deadline, why = time.monotonic() + timeout, "no answer"
    while True:
        try:
            r = http.get("/health", timeout=5.0)
            if r.status_code == 200:
                return
            why = f"/health answered {r.status_code}"
        except httpx.HTTPError as exc:
            why = type(exc).__name__
        if time.monotonic() > deadline:
            raise ServerUnavailable(
                f"no ready generation server at {http.base_url} after {timeout:g} s ({why}). Start one with:  "
                f"vroll serve --model <model> --port {http.base_url.port}  (or a stock vLLM: {STOCK_COMMAND})")
        time.sleep(1.0)


def server_kind(url: str, api_key: str | None, ready_timeout: float) -> str:
    """``"vroll"`` (``vroll serve``: ``/info`` with a ``weight_version``) or ``"stock"`` (``vllm serve``:
    ``/v1/models``); waits until the server is ready first."""
    with _http(url, api_key, 10.0) as http:
        wait_ready(http, ready_timeout)
        r = http.get("/info")
        if r.status_code == 200 and "weight_version" in r.json():
            return "vroll"
        if http.get("/v1/models").status_code == 200:
            return "stock"
    raise ValueError(f"{url} is neither a vroll server (/info) nor a vllm serve (/v1/models)")


class StockServerGenerator:
    """Completions from a stock ``vllm serve``; weights pushed with :class:`NativeWeightSender`.

    Args:
        url, api_key, ready_timeout, sync: as for ``ServerGenerator``.
        model: the trainer's model (a folder or a Hub id): a server serving another one is refused.
    """

    local = False
    servers: list = []  # no vroll /info: no GPU ids to check against the training processes' (see README)

    def __init__(self, url: str, api_key: str | None, ready_timeout: float, sync: WeightSyncConfig,
                 model: str) -> None:
        self.url = url.rstrip("/")
        self.http = _http(self.url, api_key)
        try:
            wait_ready(self.http, ready_timeout)
            self.served = self._check_server(model)
            self.weight_version = version_number(self.http.get("/weight_info").json().get("weight_version"))
            workers = int(self.http.get("/get_world_size").json()["world_size"])
            self.sync = NativeWeightSender(self.url, api_key, sync, workers, self._serving_dtype())
            self._connect()
        except BaseException:
            self.http.close()
            raise
        self._threads = ThreadPoolExecutor(MAX_CONCURRENT_REQUESTS, thread_name_prefix="vroll-stock")
        # a push never overlaps a generation of this trainer (async generation pushes only while its producer
        # is idle anyway; this makes a misuse wait, as ServerPool does, rather than split a batch's versions)
        self._lock = threading.Lock()

    def _check_server(self, model: str) -> dict[str, Any]:
        """The served model (``/v1/models``), refused if not the trainer's; the routes the trainer needs."""
        models = self.http.get("/v1/models")
        if models.status_code != 200 or not models.json().get("data"):
            raise ValueError(f"{self.url} is not a vllm serve (/v1/models answered {models.status_code})")
        served = models.json()["data"][0]
        if not _same_model(model, served):
            raise ValueError(f"the vllm serve at {self.url} serves {served.get('root') or served.get('id')!r}, "
                             f"not the trainer's model {model!r}: start it with the trainer's model")
        if self.http.get("/weight_info").status_code == 404:
            raise ValueError(f"the vllm serve at {self.url} has no RL routes (/weight_info, /pause, "
                             f"/init_weight_transfer_engine): start it with VLLM_SERVER_DEV_MODE=1, as in\n"
                             f"  {STOCK_COMMAND}")
        if self.http.post(GENERATE_ROUTE, json={}).status_code in (403, 404):
            raise ValueError(f"the vllm serve at {self.url} does not serve its token route {GENERATE_ROUTE}: "
                             f"start it with --enable-scale-out, as in\n  {STOCK_COMMAND}")
        return served

    def _serving_dtype(self) -> torch.dtype:
        """The dtype the server holds its weights in (``/server_info``'s config), so a push moves no more bytes
        than that; bfloat16 if it does not say."""
        r = self.http.get("/server_info")
        found = re.search(r"dtype=torch\.(\w+)", r.text) if r.status_code == 200 else None
        return to_dtype(found.group(1)) if found else torch.bfloat16

    def _connect(self) -> None:
        """The weight-transfer handshake now, so a server without a weight-transfer engine fails at start."""
        try:
            self.sync.connect()
        except WeightSyncError as exc:
            if "not configured" in str(exc) or "weight_transfer_config" in str(exc):
                raise ValueError(f"the vllm serve at {self.url} was started without --weight-transfer-config, so it "
                                 f"cannot take the trainer's weights: restart it with --weight-transfer-config "
                                 f"'{{\"backend\": \"{ENGINE_NAME}\"}}' (CPU; on GPU: '{{\"backend\": \"nccl\"}}'), "
                                 f"as in\n  {STOCK_COMMAND}") from None
            raise

    def generate(self, prompts: list[PromptInput], sampling: SamplingSpec, first_index: int = 0) -> Rollout:
        if any(p.images for p in prompts):
            raise ValueError("images through a stock vllm serve are not supported yet: use vroll serve for a VLM")
        start = time.perf_counter()
        with self._lock:
            answers = list(self._threads.map(
                lambda i: self._one(prompts[i], sampling, prompt_seed(sampling.seed, first_index + i)),
                range(len(prompts))))
        results = [r for r, _ in answers]
        versions = [v for _, vs in answers for v in vs]
        out = GenerateResult(results, min(versions, default=self.weight_version))
        rollout = Rollout.from_results(out, time.perf_counter() - start, prompts, sampling.return_logprobs)
        rollout.weight_versions = versions
        return rollout

    def _one(self, prompt: PromptInput, sampling: SamplingSpec, seed: int | None) -> tuple[PromptResult, list[int]]:
        body = {"token_ids": prompt.token_ids, "sampling_params": sampling_params(sampling, seed),
                "output_mode": "text", "return_token_ids": True}
        r = self.http.post(GENERATE_ROUTE, json=body)
        if r.status_code != 200:
            raise ValueError(f"{self.url}{GENERATE_ROUTE} answered {r.status_code}: {r.text[:500]}")
        answer = r.json()
        pairs = [completion(c, sampling.return_logprobs) for c in sorted(answer["choices"], key=lambda c: c["index"])]
        ids = answer.get("prompt_token_ids") or list(prompt.token_ids)
        return PromptResult(ids, [c for c, _ in pairs]), [v for _, v in pairs]

    def push_weights(self, model: torch.nn.Module) -> SyncStats:
        with self._lock:
            stats = self.sync.push(model, self.weight_version + 1)
            self.weight_version += 1
        return stats

    def end_sync(self) -> None:
        self.sync.release()

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.sync.shutdown()
        self.http.close()
