"""TRL 1.16's own ``GRPOTrainer(vllm_mode="server")`` and ``VLLMClient`` against a real ``vroll serve``.

Everything is real (TRL's trainer and client, HTTP, the engine, the workers' group and loader)
except what needs CUDA on TRL's side: its NCCL endpoint becomes vroll's documented CPU one
(:class:`GlooCommunicator`, on the same vLLM rendezvous), and its packed producer runs without CUDA
streams (vLLM's own ``pack_tensors``, one broadcast per buffer, as the CUDA producer cuts them).
The server and TRL's trainer use the shared tiny random-weight model: the checks are of routes,
pushes and served weights, which its size does not change.
"""

from __future__ import annotations

import gc
import threading

import pytest
import requests
import torch

from helpers import bf16_copy, free_port, max_served_logprob_gap, perturbed

pytestmark = pytest.mark.slow

trl = pytest.importorskip("trl")

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture
def trl_on_cpu(monkeypatch):
    """TRL's client with its two CUDA-only pieces swapped for CPU ones; nothing else of it changes."""
    import trl.generation.vllm_client as vc
    from vllm.distributed.weight_transfer.packed_tensor import DEFAULT_PACKED_BUFFER_SIZE_BYTES, pack_tensors

    from vroll.engine.native_transfer import GlooCommunicator

    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")  # vLLM's get_ip(): the trainer's rendezvous address

    def endpoint(init_info: dict) -> GlooCommunicator:  # nccl_common.trainer_init
        return GlooCommunicator.create(init_info["master_address"], init_info["master_port"], 0,
                                       init_info["world_size"], timeout_s=120)

    def producer(iterator, group, src, post_iter_func, buffer_size_bytes=DEFAULT_PACKED_BUFFER_SIZE_BYTES,
                 num_buffers=2):  # noqa: ANN001, ANN202 - packed_nccl_broadcast_producer minus the CUDA streams
        while (chunk := pack_tensors(iterator, post_iter_func, buffer_size_bytes)) is not None:
            group.broadcast(chunk.packed_tensor, src=src)

    init_communicator = vc.VLLMClient.init_communicator

    def on_cpu(self, device=0):  # noqa: ANN001, ANN202 - TRL refuses any non-CUDA device up front
        return init_communicator(self, device="cuda")  # no index: TRL selects no device

    monkeypatch.setattr(vc, "open_trainer_endpoint", endpoint)
    monkeypatch.setattr(vc, "packed_nccl_broadcast_producer", producer)
    monkeypatch.setattr(vc.VLLMClient, "init_communicator", on_cpu)
    return vc


def _close(client) -> None:  # noqa: ANN001
    """TRL's close_communicator, plus the gloo group that holds the rendezvous store (and its port)."""
    communicator = client.communicator
    client.close_communicator()
    if communicator is not None:
        communicator.pg = None
    gc.collect()


def _trainer(server, model: str, tmp_path, steps: int):  # noqa: ANN001, ANN202
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward_len(completions, **kwargs):  # noqa: ANN001, ANN003, ANN202 - varies, so advantages are not 0
        return [float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path), use_vllm=True, vllm_mode="server", vllm_server_base_url=server.url,
                      vllm_group_port=free_port(), vllm_server_timeout=30, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=16, max_steps=steps, learning_rate=1e-2,
                      bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                      disable_tqdm=True, seed=0)
    data = Dataset.from_dict({"prompt": ["Write a number:", "Name a color:", "Say hello:", "Count to three:"]})
    return GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=data)


def _served(server):  # noqa: ANN001, ANN202
    with server.client() as client:
        return client.generate(PROMPTS, temperature=0.0, max_tokens=12)


def test_grpo_trainer_trains_and_its_pushes_reach_the_served_weights(server_tiny, tiny_model, trl_on_cpu,
                                                                     tiny_hf_model, tmp_path, monkeypatch):
    before = _served(server_tiny)
    pushes: list[int] = []
    update = trl_on_cpu.VLLMClient.update_named_params

    # Negative control: TRL trains one step with its pushes dropped; the server must not change.
    monkeypatch.setattr(trl_on_cpu.VLLMClient, "update_named_params", lambda *a, **k: pushes.append(0))
    control = _trainer(server_tiny, tiny_model, tmp_path / "control", steps=1)
    control.train()
    assert pushes == [0]
    unchanged = _served(server_tiny)
    assert unchanged.weight_version == before.weight_version
    assert [c.token_ids for c in unchanged.flat()] == [c.token_ids for c in before.flat()]
    assert max_served_logprob_gap(bf16_copy(control.model), unchanged) > 1.0  # it trained; nothing was sent
    _close(control.vllm_generation.vllm_client)
    del control
    gc.collect()

    def counted(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        pushes.append(1)
        return update(self, *a, **k)

    monkeypatch.setattr(trl_on_cpu.VLLMClient, "update_named_params", counted)
    trainer = _trainer(server_tiny, tiny_model, tmp_path / "real", steps=3)
    try:
        trainer.train()
        assert pushes == [0, 1, 1, 1]  # one push before each step's generation
        trainer.vllm_generation.sync_weights()  # TRL's own push of the final weights
        after = _served(server_tiny)
        assert after.weight_version == before.weight_version + 4
        assert max_served_logprob_gap(bf16_copy(trainer.model), after) < 0.3
        assert max_served_logprob_gap(bf16_copy(tiny_hf_model), after) > 1.0  # it really changed
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 3
        trainer.vllm_generation.vllm_client.update_model_params(tiny_hf_model)  # the shared server's base weights
    finally:
        _close(trainer.vllm_generation.vllm_client)


def test_trl_client_routes_and_their_errors(server_tiny, trl_on_cpu, tiny_hf_model):
    base = server_tiny.url
    client = trl_on_cpu.VLLMClient(base_url=base, group_port=free_port())
    assert client.get_world_size() == 1
    assert client.get_server_info()["weight_transfer_config"] == {"backend": "gloo"}
    out = client.generate([[1, 504, 3575, 282, 4649, 314]], n=2, max_tokens=6, temperature=1.0,
                          generation_kwargs={"seed": 3})
    assert len(out["completion_ids"]) == 2 and out["prompt_ids"] == [[1, 504, 3575, 282, 4649, 314]]
    assert [len(lp) for lp in out["logprobs"]] == [len(c) for c in out["completion_ids"]]
    assert out["logprob_token_ids"][0] == [[t] for t in out["completion_ids"][0]]
    chat = client.chat([[{"role": "user", "content": "Hi"}]], max_tokens=4, temperature=0.0)
    assert len(chat["completion_ids"]) == 1 and len(chat["prompt_ids"][0]) > 1

    def post(path: str, body: dict | None = None, session: requests.Session | None = None) -> requests.Response:
        return (session or requests).post(f"{base}{path}", json=body if body is not None else {}, timeout=30)

    def error(r: requests.Response, status: int, words: str) -> None:
        assert r.status_code == status, r.text
        assert words in r.json()["error"], r.text

    error(post("/v1/completions", {"prompt": [1, 2], "logprobs": 5}), 422, "sampled token's logprob only")
    error(post("/v1/completions", {"prompt": [1, 2], "stream": True}), 422, "stream")
    error(post("/v1/completions", {"prompt": [1, 2], "prompt_logprobs": 3}), 422, "prompt_logprobs")
    error(post("/v1/completions", {"prompt": [1, 2], "model": "gpt-2"}), 404, "is not served here")
    error(post("/v1/completions", {"prompt": []}), 422, "no prompt given")
    hidden = tiny_hf_model.config.hidden_size
    update = {"update_info": {"names": ["model.norm.weight"], "dtype_names": ["float32"], "shapes": [[hidden]]}}
    # no cookie: 409 when no trainer holds the session (unit-tested), 403 once one does (the earlier test's)
    assert post("/update_weights", update).status_code in (403, 409)

    info = {"master_address": "127.0.0.1", "master_port": free_port(), "world_size": 3}
    error(post("/init_weight_transfer_engine", {"init_info": info}), 400, "worker(s) after rank_offset 1 make 2")
    error(post("/init_weight_transfer_engine", {"init_info": {**info, "world_size": 2}}), 400,
          "no weight-sync rendezvous answered")

    client.init_communicator(device="cpu")
    try:
        stranger = requests.Session()  # no cookie: it may generate, never push
        error(post("/start_weight_update", session=stranger), 403, "carries no weight-transfer session")
        client._updating_weights = True  # TRL then posts /update_weights (and broadcasts) without a start
        layer0 = [(n, p) for n, p in tiny_hf_model.named_parameters()][:1]
        with pytest.raises(Exception, match="409.*call /start_weight_update first"):  # drained: no hang
            client.update_named_params([(n, "float32", list(p.shape)) for n, p in layer0], iter(layer0))
        client._updating_weights = False
        post("/start_weight_update", session=client.session).raise_for_status()
        client._updating_weights = True  # inside the bracket just opened: each refused manifest leaves it open
        # through TRL's client, which broadcasts the bytes with its request (a bare POST sends none, and the
        # server, which drains a refused update's bytes so that TRL's broadcast is released, would wait for them)
        for name, dtype, tensor, words in (("model.norm.weight", "float32", torch.ones(7), rf"expects \[{hidden}\]"),
                                           ("model.no_such.weight", "float32", torch.ones(7), "not a weight of the"),
                                           ("model.norm.weight", "int32", torch.ones(hidden, dtype=torch.int32),
                                            "floating-point")):
            with pytest.raises(Exception, match=f"400.*{words}"):
                client.update_named_params([(name, dtype, list(tensor.shape))], iter([(name, tensor)]))
        client._updating_weights = False
        version = client.session.get(f"{base}/info").json()["weight_version"]
        layer = [(n, p) for n, p in tiny_hf_model.named_parameters() if n == "model.layers.0.mlp.up_proj.weight"]
        with pytest.raises(Exception, match="send whole layers"):  # TRL raises on /finish_weight_update's 400
            client.update_named_params([(n, "float32", list(p.shape)) for n, p in layer], iter(layer))
        assert client.session.get(f"{base}/info").json()["weight_version"] == version  # nothing was loaded
    finally:
        _close(client)


def _trl_logprob_gap(model, out: dict) -> float:  # noqa: ANN001
    """The largest |``model``'s teacher-forced logprob - the served one| over TRL's ``generate`` output
    (prompt-major: ``n`` completions per prompt; ``logprobs`` of shape (sequence, token, 1))."""
    n = len(out["completion_ids"]) // len(out["prompt_ids"])
    gaps = []
    for i, (ids, served) in enumerate(zip(out["completion_ids"], out["logprobs"], strict=True)):
        prompt = out["prompt_ids"][i // n]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
        mine = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
        gaps.append((mine - torch.tensor([lp[0] for lp in served])).abs().max())
    return float(max(gaps))


def test_trl_client_update_makes_the_server_serve_those_weights(server_tiny, trl_on_cpu, tiny_hf_model):
    """TRL's own generate and update_model_params: after the push the served logprobs are the pushed
    model's; a refused push answers TRL with the 400 (its broadcast is drained, no hang)."""
    client = trl_on_cpu.VLLMClient(base_url=server_tiny.url, group_port=free_port())
    prompts = [[1, 504, 3575, 282, 4649, 314], [1, 7, 20, 42]]
    new = perturbed(tiny_hf_model, 0.5, seed=7)  # the tiny model needs more noise than a trained one to move
    kwargs = {"n": 2, "max_tokens": 10, "temperature": 1.0, "generation_kwargs": {"seed": 5}}
    client.init_communicator(device="cpu")
    try:
        before = client.generate(prompts, **kwargs)
        assert _trl_logprob_gap(bf16_copy(new), before) > 1.0  # negative control: not pushed yet
        wrong = [(n, p) for n, p in new.named_parameters()][:1]
        with pytest.raises(Exception, match="400.*the served model expects"):
            client.update_named_params([(wrong[0][0], "float32", [3, 7])], iter([(wrong[0][0], torch.ones(3, 7))]))
        assert client.generate(prompts, **kwargs)["completion_ids"] == before["completion_ids"]  # unchanged

        client.update_model_params(new)
        client.reset_prefix_cache()
        after = client.generate(prompts, **kwargs)
        assert _trl_logprob_gap(bf16_copy(new), after) < 0.3
        assert _trl_logprob_gap(bf16_copy(tiny_hf_model), after) > 1.0
    finally:
        client.update_model_params(tiny_hf_model)  # the shared server serves the base weights again
        _close(client)


def test_pause_holds_generation_until_resume(server_tiny, trl_on_cpu):
    client = trl_on_cpu.VLLMClient(base_url=server_tiny.url)
    url = server_tiny.url
    bad = requests.post(f"{url}/pause", params={"mode": "freeze"}, timeout=30)
    assert bad.status_code == 422 and "mode" in bad.json()["error"]
    requests.post(f"{url}/pause", params={"mode": "keep"}, timeout=30).raise_for_status()
    assert requests.get(f"{url}/is_paused", timeout=30).json() == {"is_paused": True}
    done: list[dict] = []
    held = threading.Thread(target=lambda: done.append(client.generate([[1, 7, 20]], max_tokens=3)))
    held.start()
    held.join(3)
    assert held.is_alive() and not done  # held at the door while paused
    requests.post(f"{url}/resume", timeout=30).raise_for_status()
    held.join(60)
    assert len(done) == 1 and len(done[0]["completion_ids"][0]) == 3
    assert requests.get(f"{url}/is_paused", timeout=30).json() == {"is_paused": False}
    assert requests.get(f"{url}/weight_info", timeout=30).json()["weight_version"].isdigit()
