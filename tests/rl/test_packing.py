"""Packed (padding-free) micro-batches and micro-batches by token budget (``vroll.rl.packing``).

Packed rows must give the padded batch's per-token logps and gradients (``completion_logps``, the
path the trainer runs today), on the embedded SmolLM2 (Llama) and a tiny Qwen2, with transformers'
own packed-sequence detection (sdpa, eager) and with ``vroll_varlen`` (its CPU loop; the CUDA
kernel is checked by ``benchmarks/gpu/packing_probe.py``). Token-budget micro-batches must fit the
budget and, with the window's normalizers, sum to the window's loss for every loss type.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_tiny_model
from vroll.models import resolve_model
from vroll.rl.logprobs import scoring_forward, to_rows
from vroll.rl.losses import Normalizers, PolicyLossConfig, policy_loss
from vroll.rl.packing import (
    VARLEN_ATTENTION,
    PackedRows,
    even_out,
    pack_rows,
    register_varlen_attention,
    row_cost,
    spread,
    token_budget_partition,
)
from vroll.trainer.logps import completion_logps, pad_batch

# ---------------------------------------------------------------- layout


def test_pack_rows_layout_by_hand():
    # row 0: prompt [11, 12], completion [21, 22, 23]; row 1: prompt [13], completion [24]
    batch = pad_batch([[11, 12], [13]], [[21, 22, 23], [24]], pad_id=0)
    packed = pack_rows(batch.input_ids, batch.attention_mask, batch.completion_ids)
    assert packed.input_ids.tolist() == [[11, 12, 21, 22, 23, 13, 24]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert packed.cu_seqlens.tolist() == [0, 5, 7] and packed.max_seqlen == 5
    assert packed.positions.tolist() == [1, 2, 3, 5]  # the token before each completion token
    assert packed.targets.tolist() == [21, 22, 23, 24]
    assert packed.mask.tolist() == [[True, True, True], [True, False, False]]


def test_a_row_without_prompt_is_refused():
    batch = pad_batch([[11, 12], [13]], [[21], [24]], pad_id=0)
    batch.attention_mask[1, :2] = 0  # no prompt token left in row 1
    with pytest.raises(ValueError, match="prompt token"):
        pack_rows(batch.input_ids, batch.attention_mask, batch.completion_ids)


# ---------------------------------------------------------------- packed against padded, through real models


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return {"smollm2": resolve_model(None), "tiny-qwen2": make_tiny_model(tmp_path_factory.mktemp("tiny"))}


def _batch():
    """Four rows of uneven prompts and completions (one completion of a single token)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    comps = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (6, 1, 11, 4)]
    return pad_batch(prompts, comps, pad_id=2)


def _logps_and_grads(model, fn):
    model.zero_grad()
    out = fn()
    (out * _batch().completion_mask).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed(model, packed: PackedRows, varlen: bool = False, **overrides):
    kwargs = packed.forward_kwargs(varlen=varlen) | overrides
    with scoring_forward(model):
        logps, _ = model(**kwargs, score=packed.request(chunk_tokens=4))
    return to_rows(logps, packed.mask)


def _worst(grads, grads_ref) -> float:
    return max(float((grads[n] - g).norm() / g.norm()) for n, g in grads_ref.items() if g.norm() > 0)


@pytest.mark.parametrize(("name", "attn"), [("smollm2", "sdpa"), ("tiny-qwen2", "sdpa"), ("tiny-qwen2", "eager"),
                                            ("tiny-qwen2", VARLEN_ATTENTION)])
def test_packed_rows_give_the_padded_logps_and_gradients(paths, name, attn):
    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32, attn_implementation=attn)
    batch, mask = _batch(), _batch().completion_mask
    ref, grads_ref = _logps_and_grads(model, lambda: completion_logps(model, batch)[0])
    packed = pack_rows(batch.input_ids, batch.attention_mask, batch.completion_ids)
    varlen = attn == VARLEN_ATTENTION  # sdpa/eager: transformers' detection from the restarting positions
    out, grads = _logps_and_grads(model, lambda: _packed(model, packed, varlen))
    torch.testing.assert_close(out * mask, ref * mask, rtol=0, atol=1e-4)
    assert _worst(grads, grads_ref) < 1e-3
    # controls: sdpa/eager given positions that do not restart see one long sequence (no block-diagonal
    # mask); varlen told the rows are one attends across them (running positions alone change nothing
    # there: rotary attention depends on position differences within a row only)
    S = packed.input_ids.shape[1]
    wrong = (_packed(model, packed, varlen, cu_seq_lens_q=torch.tensor([0, S], dtype=torch.int32), max_length_q=S)
             if varlen else _packed(model, packed, position_ids=torch.arange(S).unsqueeze(0)))
    assert float(((wrong.detach() - ref) * mask).abs().max()) > 0.05


def test_varlen_model_runs_padded_batches_and_bare_positions_and_checkpointing(paths):
    """``vroll_varlen`` stays the model's implementation: a padded batch gets sdpa's numbers; packed rows
    given only their positions are still kept apart; gradient checkpointing recomputes the same path."""
    register_varlen_attention()
    sdpa = AutoModelForCausalLM.from_pretrained(paths["tiny-qwen2"], dtype=torch.float32, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_pretrained(paths["tiny-qwen2"], dtype=torch.float32,
                                                 attn_implementation=VARLEN_ATTENTION)
    batch, mask = _batch(), _batch().completion_mask
    ref, grads_ref = _logps_and_grads(sdpa, lambda: completion_logps(sdpa, batch)[0])
    padded, grads = _logps_and_grads(model, lambda: completion_logps(model, batch)[0])
    torch.testing.assert_close(padded * mask, ref * mask, rtol=0, atol=1e-5)
    packed = pack_rows(batch.input_ids, batch.attention_mask, batch.completion_ids)
    bare = _packed(model, packed, varlen=False)  # no cu_seq_lens: derived from the positions
    torch.testing.assert_close(bare.detach() * mask, ref * mask, rtol=0, atol=1e-4)
    model.gradient_checkpointing_enable()
    model.train()
    out, grads = _logps_and_grads(model, lambda: _packed(model, packed, varlen=True))
    torch.testing.assert_close(out * mask, ref * mask, rtol=0, atol=1e-4)
    assert _worst(grads, grads_ref) < 1e-3


# ---------------------------------------------------------------- token budget


def _lengths(n: int = 32, seed: int = 0) -> tuple[list[int], list[int]]:
    """Prompts of 20-60 tokens and long-tailed completions of 16-1024."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(20, 61, (n,), generator=g).tolist()
    comps = (16 + (1008 * torch.rand(n, generator=g) ** 3)).long().tolist()
    return prompts, comps


@pytest.mark.parametrize("packed", [True, False])
def test_micro_batches_fit_the_budget_and_hold_every_row_once(packed):
    prompts, comps = _lengths()
    budget = 2048
    parts = token_budget_partition(prompts, comps, budget, packed=packed)
    assert sorted(i for p in parts for i in p) == list(range(32))
    assert all(row_cost(prompts, comps, p, packed) <= budget for p in parts)
    assert parts == token_budget_partition(prompts, comps, budget, packed=packed)  # deterministic
    assert [p[0] for p in parts] == sorted(p[0] for p in parts) and all(p == sorted(p) for p in parts)
    total = sum(prompts) + sum(comps)
    if packed:  # LPT reaches the lower bound here, and balances: no micro-batch far above the mean
        assert len(parts) == -(-total // budget)
        loads = [row_cost(prompts, comps, p, True) for p in parts]
        assert max(loads) - min(loads) < max(p + c for p, c in zip(prompts, comps, strict=True))
    # control: fixed micro-batches of 4 rows, as today, pad each to its longest row: more tokens in all
    fixed = sum(row_cost(prompts, comps, list(range(i, i + 4)), False) for i in range(0, 32, 4))
    assert sum(row_cost(prompts, comps, p, packed) for p in parts) < fixed


def test_a_row_longer_than_the_budget_names_the_fix():
    with pytest.raises(ValueError, match="max_prompt_length"):
        token_budget_partition([10, 500], [10, 600], budget=1000)


def test_even_out_splits_the_costliest_and_then_adds_empty_micro_batches():
    prompts, comps = _lengths(8)
    parts = token_budget_partition(prompts, comps, 4096)
    out = even_out(parts, len(parts) + 3, prompts, comps)
    assert len(out) == len(parts) + 3 and sorted(i for p in out for i in p) == list(range(8))
    assert max(row_cost(prompts, comps, p, True) for p in out) <= max(row_cost(prompts, comps, p, True)
                                                                       for p in parts)
    many = even_out(parts, 11, prompts, comps)  # 8 rows, 11 micro-batches: 3 empty ones (dummy rows)
    assert [len(p) for p in many].count(0) == 3 and all(len(p) == 1 for p in many if p)
    with pytest.raises(ValueError, match="cannot become"):
        even_out(parts, len(parts) - 1, prompts, comps)


# ---------------------------------------------------------------- the losses stay exact


def _window():
    """A window of 12 rows (an optimizer step on one process) with uneven lengths, off-policy ratios,
    a zero-advantage row, an empty (truncated, masked) row, IS weights and reference logps."""
    g = torch.Generator().manual_seed(3)
    lengths = [3, 17, 5, 1, 30, 8, 12, 2, 25, 6, 9, 4]
    C = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (C - n) for n in lengths])
    mask[7] = 0.0
    logps = (-torch.rand(12, C, generator=g)).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(12, C, generator=g)
    adv = torch.randn(12, generator=g)
    adv[2] = 0.0
    return lengths, logps, old, adv, mask, 0.5 + torch.rand(12, C, generator=g), -torch.rand(12, C, generator=g)


def _loss(rows, logps, old, adv, mask, is_w, ref, config, **normalizers):
    return policy_loss(logps[rows], old[rows], adv[rows], mask[rows], config, is_weights=is_w[rows],
                       ref_logps=ref[rows], norm=Normalizers(**normalizers)).loss


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_budget_micro_batches_sum_to_the_window_loss(loss_type, level):
    """Each micro-batch carries the window's rows (grpo, dr_grpo) and tokens (bnpo) and is not divided by
    the number of micro-steps; dapo's ``num_items`` is the window's already. Their losses and gradients
    then sum to the window's as one batch, however the rows are cut, dummy micro-batches included."""
    lengths, logps, old, adv, mask, is_w, ref = _window()
    common = PolicyLossConfig(loss_type=loss_type, importance_sampling_level=level, max_completion_length=32,
                              beta=0.05)
    every = list(range(12))
    whole = _loss(every, logps, old, adv, mask, is_w, ref, common, num_items=float(mask.sum()))
    (grad_whole,) = torch.autograd.grad(whole, logps)
    parts = token_budget_partition([4] * 12, lengths, budget=40) + [[]]  # and a dummy one (even_out's)
    assert len({len(p) for p in parts}) > 2  # micro-batches of uneven row counts
    window = dict(num_items=float(mask.sum()), num_sequences=12, num_tokens=float(mask.sum()))
    dummy_mask = mask.clone()
    dummy_mask[3] = 0.0  # a dummy micro-batch runs one row with nothing in its loss mask
    losses = [_loss(p or [3], logps, old, adv, mask if p else dummy_mask, is_w, ref, common, **window)
              for p in parts]
    assert all(loss.requires_grad for loss in losses) and losses[parts.index([])].item() == 0.0
    (grad_parts,) = torch.autograd.grad(sum(losses), logps)
    torch.testing.assert_close(sum(losses), whole, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_parts, grad_whole, rtol=1e-5, atol=1e-7)
    # control: today's per-micro-batch normalizers (its own rows and tokens, 1 / micro-steps) give another
    # loss wherever the normalizer counts rows or tokens of the micro-batch
    today = sum(_loss(p or [3], logps, old, adv, mask if p else dummy_mask, is_w, ref, common,
                      num_items=float(mask.sum()))
                * (1.0 if loss_type == "dapo" else 1.0 / len(parts)) for p in parts)
    assert (abs(today.item() - whole.item()) > 1e-4) == (loss_type != "dapo")


def test_spread_fills_the_last_micro_steps_so_a_window_ends_on_a_micro_batch():
    assert spread([0, 1, 2, 3, 4], 3) == [[0], [1, 2], [3, 4]]
    assert spread(["a", "b"], 4) == [[], [], ["a"], ["b"]]  # the last micro-step runs backward(last=True)
    assert spread([], 2) == [[], []]
    with pytest.raises(ValueError, match="slots must be >= 1"):
        spread([1], 0)
