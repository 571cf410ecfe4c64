"""Weight sync into a real DP=2 server over gloo: every replica, LoRA, in-flight
requests, and every way a sync can go wrong."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import bf16_copy, max_served_logprob_gap, perturbed
from vroll.client import ServerError
from vroll.protocol import Bucket, TensorMeta
from vroll.weightsync.sender import WeightSender, WeightSyncConfig, WeightSyncError

pytestmark = pytest.mark.slow

PROMPTS = ["What is 17 + 25?", "Name a color."]  # one per replica under DP=2


@pytest.fixture(scope="module")
def sync(server_dp2, hf_model):
    """A connected trainer; puts the original weights back at the end."""
    client = server_dp2.client()
    syncer = WeightSender(client, WeightSyncConfig(bucket_mb=32))
    syncer.connect()
    yield syncer
    syncer.push(hf_model)
    syncer.close()


def test_perturbed_weights_reach_every_replica(server_dp2, sync, hf_model):
    client = server_dp2.client()
    before = client.generate(PROMPTS, temperature=0.0, max_tokens=12)
    new = perturbed(hf_model, 0.1, seed=1)
    stats = sync.push(new)
    assert stats.weight_version == before.weight_version + 1 == client.info().weight_version
    assert stats.num_buckets > 1 and stats.num_bytes == sum(p.numel() * 2 for p in hf_model.parameters())
    phases = dataclasses.asdict(stats.phases)  # the sender times its own steps
    assert all(s > 0 for s in phases.values()) and sum(phases.values()) <= stats.seconds, phases
    after = client.generate(PROMPTS, temperature=0.0, max_tokens=12)
    assert after.weight_version == stats.weight_version
    reference = bf16_copy(new)
    assert max_served_logprob_gap(reference, after) < 0.3
    assert max_served_logprob_gap(bf16_copy(hf_model), after) > 1.0  # it really is a different model
    for r in after.results:  # greedy under the new weights: the reference's argmax, token by token
        ids = r.prompt_token_ids + r.completions[0].token_ids
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0, len(r.prompt_token_ids) - 1 : -1]
        agree = (logits.argmax(-1) == torch.tensor(r.completions[0].token_ids)).float().mean()
        assert agree >= 0.9


def test_lora_model_syncs_its_merged_weights(server_dp2, sync, hf_model):
    peft = pytest.importorskip("peft")
    import copy

    model = peft.get_peft_model(copy.deepcopy(hf_model),
                                peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    sync.push(model)
    merged = copy.deepcopy(model).merge_and_unload()
    out = server_dp2.client().generate(PROMPTS, temperature=1.0, max_tokens=12, seed=5)
    assert max_served_logprob_gap(bf16_copy(merged), out) < 0.3
    assert max_served_logprob_gap(bf16_copy(hf_model), out) > 0.5
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    # unmerged after the sync (W + BA - BA: equal up to float32 rounding)
    torch.testing.assert_close(q, hf_model.model.layers[0].self_attn.q_proj.weight, atol=1e-6, rtol=0)


def test_each_in_flight_request_is_served_by_one_version(server_dp2, sync, hf_model):
    client = server_dp2.client()
    old = perturbed(hf_model, 0.1, seed=11)
    new = perturbed(hf_model, 0.1, seed=12)
    v_old = sync.push(old).weight_version
    refs = {v_old: bf16_copy(old), v_old + 1: bf16_copy(new)}
    prompts = [f"Count from {i} to {i + 20}:" for i in range(4)]

    def ask(i: int):
        return client.generate(prompts, temperature=1.0, max_tokens=24, seed=i)

    def ask_once_accepted(i: int):  # the server has queued the weights when this request arrives
        assert accepted.wait(120)
        return ask(i)

    accepted, pushed = threading.Event(), threading.Event()
    announce = sync.client.weights_update
    sync.client.weights_update = lambda *a, **kw: (announce(*a, **kw), accepted.set())[0]
    try:
        with ThreadPoolExecutor(4) as pool:
            early = [pool.submit(ask, i) for i in range(3)]
            pool.submit(lambda: (sync.push(new), pushed.set()))
            late = [pool.submit(ask_once_accepted, i) for i in range(3, 6)]
            outs = [f.result(timeout=600) for f in early + late]
    finally:
        del sync.client.weights_update  # the bound method again
    assert pushed.is_set()
    versions = [o.weight_version for o in outs]
    assert set(versions) <= set(refs) and versions[-1] == v_old + 1
    for out in outs:  # the whole response, every replica's part, comes from the version it names
        assert max_served_logprob_gap(refs[out.weight_version], out) < 0.3


def _wire(name: str, shape: list[int], dtype: str = "bfloat16") -> list[Bucket]:
    return [Bucket(dtype, (TensorMeta(name, dtype, tuple(shape)),))]


@pytest.mark.parametrize(("buckets", "reason"), [
    (_wire("model.layers.0.mlp.nonexistent.weight", [4, 4]), "is not a weight of the served model"),
    (_wire("model.norm.weight", [575]), "has shape [575], the served model expects [576]"),
    (_wire("model.norm.weight", [576], "float32"), "bucket dtype float32 != serving dtype bfloat16"),
    (_wire("model.norm.weight", [576], "int3"), "unsupported dtype 'int3'"),
    (_wire("model.layers.0.self_attn.q_proj.weight", [576, 576]), "updates part of layer model.layers.0"),
])
def test_bad_manifests_are_refused_before_anything_moves(server_dp2, sync, buckets, reason):
    client = server_dp2.client()
    version = client.info().weight_version
    before = client.generate(PROMPTS, temperature=0.0, max_tokens=6)
    with pytest.raises(ServerError) as err:
        client.weights_update(sync.session_id, buckets)
    assert err.value.status == 400 and reason in err.value.reason
    after = client.generate(PROMPTS, temperature=0.0, max_tokens=6)
    assert client.info().weight_version == version == after.weight_version
    assert [r.completions[0].token_ids for r in after.results] == \
        [r.completions[0].token_ids for r in before.results]


def test_a_model_that_does_not_fit_is_refused_with_the_name(server_dp2, sync):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=576, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3))
    with pytest.raises(WeightSyncError, match="model.embed_tokens.weight' has shape"):
        sync.push(other)


DYING_TRAINER = """
import os, sys, torch
from transformers import AutoModelForCausalLM
from vroll.client import GenerationClient
from vroll.weightsync.sender import WeightSender, WeightSyncConfig
from vroll.weightsync.buckets import plan_buckets
from vroll.weightsync.source import ModelSource
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
with torch.no_grad():
    for p in model.parameters():
        p.mul_(0.0)  # would make the model useless, if it were ever loaded
ws = WeightSender(GenerationClient(sys.argv[1]), WeightSyncConfig(bucket_mb=8))
ws.connect(force=True)
source = ModelSource(model, torch.bfloat16)
plan = plan_buckets(source.metadata(), 8 << 20)
update = ws.client.weights_update(ws.session_id, plan)
print("UPDATE", update.update_id, ws.session_id, flush=True)
for bucket in plan[: len(plan) // 2]:
    ws.send_bucket(source, bucket)
os._exit(1)  # killed mid-sync
"""


def test_trainer_killed_mid_sync_leaves_the_last_complete_weights(server_dp2, sync, hf_model, model_path):
    client = server_dp2.client()
    reference = perturbed(hf_model, 0.1, seed=21)
    version = sync.push(reference).weight_version
    before = client.generate(PROMPTS, temperature=0.0, max_tokens=8)
    run = subprocess.run([sys.executable, "-c", DYING_TRAINER, server_dp2.url, model_path],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr[-2000:]
    update_id, session_id = run.stdout.split("UPDATE")[1].split()[:2]
    status = client.weights_status(session_id, int(update_id))
    assert status.state == "failed" and "previous weights kept" in status.error
    after = client.generate(PROMPTS, temperature=0.0, max_tokens=8)
    assert after.weight_version == version
    assert [r.completions[0].token_ids for r in after.results] == \
        [r.completions[0].token_ids for r in before.results]
    assert max_served_logprob_gap(bf16_copy(reference), after) < 0.3
    # The dead trainer's session is stale: a new init replaces it without force.
    sync.connect()
    assert sync.push(hf_model).weight_version == version + 1


def test_a_second_live_trainer_is_refused_unless_it_forces(server_dp2, sync, hf_model):
    other = WeightSender(server_dp2.client(), WeightSyncConfig(bucket_mb=64))
    with pytest.raises(ServerError) as err:
        other.connect()
    assert err.value.status == 409 and "another trainer" in err.value.reason
    other.connect(force=True)
    with pytest.raises(WeightSyncError, match="not the current one"):
        sync.push(hf_model)
    other.push(hf_model)
    other.close()
    sync.connect()  # back to the module's trainer for the teardown


def test_nan_weights_are_never_pushed(server_dp2, sync, hf_model):
    """A diverged model (NaN in one tensor) cancels the sync: both replicas keep the last weights."""
    import copy

    client = server_dp2.client()
    before = client.generate(PROMPTS, temperature=0.0, max_tokens=6)
    broken = copy.deepcopy(hf_model)
    with torch.no_grad():
        broken.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(WeightSyncError, match=r"NaN/inf values in model\.layers\.3\.mlp\.down_proj\.weight.*sync "
                                               r"cancelled, the server keeps serving weight_version"):
        sync.push(broken)
    after = client.generate(PROMPTS, temperature=0.0, max_tokens=6)
    assert after.weight_version == before.weight_version
    for a, b in zip(before.results, after.results, strict=True):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        assert a.completions[0].logprobs == pytest.approx(b.completions[0].logprobs, abs=1e-6)
    sync.push(hf_model)  # the session still works after a cancelled sync
    assert client.info().weight_version == before.weight_version + 1
