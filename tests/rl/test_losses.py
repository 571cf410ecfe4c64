import math

import pytest
import torch

from vroll.rl.losses import (
    Normalizers,
    PolicyLossConfig,
    online_dpo_loss,
    policy_loss,
    rows_with_gradient,
    selective_log_softmax,
)

LN2 = math.log(2.0)


# ---------------------------------------------------------------- selective_log_softmax


def test_selective_log_softmax_hand_values():
    # Row [0, 0] -> log(1/2); row [0, ln 3] -> token 1 has p = 3/4.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    out = selective_log_softmax(logits, torch.tensor([[0, 1]]))
    torch.testing.assert_close(out, torch.tensor([[-LN2, math.log(0.75)]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_matches_full_log_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g).to(dtype)
    index = torch.randint(0, 11, (3, 5), generator=g)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    out = selective_log_softmax(logits, index)
    assert out.shape == (3, 5) and out.dtype == dtype
    torch.testing.assert_close(
        out.float(), ref, atol=3e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0
    )


# ---------------------------------------------------------------- aggregation


def _on_policy_batch():
    # On-policy: ratio 1, so the per-token loss is -A. Row 0 has 2 tokens (A=1 -> -1 each),
    # row 1 has 3 tokens (A=-2 -> +2 each). Token sum = -2 + 6 = 4, 5 tokens.
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.7, -0.1]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    return logps, logps.clone(), torch.tensor([1.0, -2.0]), mask


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "norm", "expected"),
    [
        ("grpo", {}, Normalizers(), (-1.0 + 2.0) / 2),  # mean of per-sequence means
        ("bnpo", {}, Normalizers(), 4.0 / 5),  # token sum / token count
        ("dr_grpo", {"max_completion_length": 4}, Normalizers(), 4.0 / (2 * 4)),
        ("dapo", {}, Normalizers(), 4.0 / 5),  # local token count by default
        ("dapo", {}, Normalizers(num_items=10.0), 4.0 / 10),  # global count from the caller
    ],
)
def test_aggregation_hand_values(loss_type, kwargs, norm, expected):
    logps, old, adv, mask = _on_policy_batch()
    out = policy_loss(logps, old, adv, mask, PolicyLossConfig(loss_type=loss_type, **kwargs), norm=norm)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.metrics["clip_ratio"] == 0.0
    assert "kl" not in out.metrics and "is_ratio" not in out.metrics


def test_unknown_loss_type_lists_valid_ones():
    logps, old, adv, mask = _on_policy_batch()
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        policy_loss(logps, old, adv, mask, PolicyLossConfig(loss_type='ppo'))


def test_dr_grpo_requires_max_completion_length():
    logps, old, adv, mask = _on_policy_batch()
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logps, old, adv, mask, PolicyLossConfig(loss_type='dr_grpo'))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_a_micro_batch_is_its_share_of_the_step(loss_type):
    """With GA micro-batches per step, each loss is 1/GA of its own normalized value, except dapo's, whose
    ``num_items`` already counts the step's tokens (the rule lives here, not in the trainer)."""
    logps, old, adv, mask = _on_policy_batch()
    one, four = (policy_loss(logps, old, adv, mask, PolicyLossConfig(loss_type=loss_type, max_completion_length=4,
                                                                     accumulation_steps=ga)).loss for ga in (1, 4))
    assert four.item() == pytest.approx(one.item() if loss_type == "dapo" else one.item() / 4)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("epsilon_low", -0.1, "epsilon_low"), ("beta", -1.0, "beta"), ("accumulation_steps", 0, "accumulation_steps")])
def test_bad_loss_settings_are_refused_when_the_config_is_made(field, value, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**{field: value})


def test_shape_mismatch_is_rejected():
    logps, old, adv, mask = _on_policy_batch()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logps, old, adv.unsqueeze(-1), mask)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logps, old, adv, mask[:, :2])
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(logps, old, adv, mask, PolicyLossConfig(importance_sampling_level='word'))


# ---------------------------------------------------------------- rows without gradient


def _rows_case():
    """6 sequences: rows 1 and 4 have advantage 0, row 3 no token in the mask (truncated and masked)."""
    g = torch.Generator().manual_seed(7)
    logps = (-torch.rand(6, 5, generator=g)).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(6, 5, generator=g)  # off-policy: ratios away from 1, some clipped
    adv = torch.tensor([1.2, 0.0, -0.7, 0.9, 0.0, -1.1])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0],
                         [0, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    is_w = 0.5 + torch.rand(6, 5, generator=g)
    return logps, old, adv, mask, is_w


def test_rows_with_gradient_are_those_with_an_advantage_and_a_token():
    _, _, adv, mask, _ = _rows_case()
    assert rows_with_gradient(adv, mask, beta=0.0).tolist() == [True, False, True, False, False, True]
    assert rows_with_gradient(adv, mask, beta=0.1).tolist() == [True, True, True, False, True, True]  # KL pulls


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_leaving_out_rows_without_gradient_keeps_loss_and_gradient(loss_type, level):
    logps, old, adv, mask, is_w = _rows_case()
    config = PolicyLossConfig(loss_type=loss_type, importance_sampling_level=level, max_completion_length=5)
    full = policy_loss(logps, old, adv, mask, config, is_weights=is_w, norm=Normalizers(num_items=40.0)).loss
    (grad_full,) = torch.autograd.grad(full, logps)
    rows = rows_with_gradient(adv, mask, beta=0.0)
    assert bool((grad_full[~rows] == 0).all())  # what is left out had no gradient
    part = logps[rows]
    whole = Normalizers(num_items=40.0, num_sequences=6, num_tokens=float(mask.sum()))
    kept = policy_loss(part, old[rows], adv[rows], mask[rows], config, is_weights=is_w[rows], norm=whole).loss
    (grad_kept,) = torch.autograd.grad(kept, logps)
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_kept, grad_full, rtol=1e-6, atol=1e-7)
    # control: the kept rows' own normalizers give another loss wherever the normalizer counts rows or tokens
    alone = policy_loss(part, old[rows], adv[rows], mask[rows], config, is_weights=is_w[rows],
                        norm=Normalizers(num_items=40.0)).loss
    assert (abs(alone.item() - full.item()) > 1e-4) == (loss_type != "dapo")


# ---------------------------------------------------------------- clipping


def _clip_case(epsilon_high=0.2):
    # Four one-token sequences with ratios r and advantages A (eps_low = 0.2):
    #   r=1.5, A=+1: min(1.5, 1.2)  = 1.2  -> loss -1.2 (high clip, no grad)
    #   r=0.5, A=-1: min(-0.5,-0.8) = -0.8 -> loss +0.8 (low clip, no grad)
    #   r=0.5, A=+1: min(0.5, 0.8)  = 0.5  -> loss -0.5 (unclipped, grad -r*A/4 = -0.125)
    #   r=1.5, A=-1: min(-1.5,-1.2) = -1.5 -> loss +1.5 (unclipped, grad -r*A/4 = +0.375)
    ratios = torch.tensor([[1.5], [0.5], [0.5], [1.5]])
    logps = ratios.log().requires_grad_(True)
    out = policy_loss(logps, torch.zeros(4, 1), torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.ones(4, 1),
                      PolicyLossConfig(epsilon_high=epsilon_high))
    return logps, out


def test_clipped_objective_values_and_gradients():
    logps, out = _clip_case()
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 4, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0], [0.0], [-0.125], [0.375]]))


def test_clip_metrics():
    _, out = _clip_case()
    assert out.metrics["clip_ratio_low"] == pytest.approx(0.25)
    assert out.metrics["clip_ratio_high"] == pytest.approx(0.25)
    assert out.metrics["clip_ratio"] == pytest.approx(0.5)


def test_clip_higher_epsilon():
    # With eps_high = 0.6 the r=1.5, A=+1 token is no longer clipped: loss -1.5.
    _, out = _clip_case(epsilon_high=0.6)
    assert out.loss.item() == pytest.approx((-1.5 + 0.8 - 0.5 + 1.5) / 4, abs=1e-6)
    assert out.metrics["clip_ratio_high"] == 0.0


def test_clip_metrics_ignore_padding():
    # The padded token has a huge ratio and A > 0 but must not count.
    logps = torch.tensor([[0.0, 5.0]])
    out = policy_loss(logps, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]))
    assert out.metrics["clip_ratio_high"] == 0.0
    assert out.loss.item() == pytest.approx(-1.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_garbage_in_padding_gives_finite_loss_and_grads(level):
    logps = torch.tensor([[-1.0, 80.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -float("inf")]])
    out = policy_loss(logps, old, torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]),
                      PolicyLossConfig(importance_sampling_level=level, beta=0.1),
                      ref_logps=torch.tensor([[-1.0, 90.0]]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.0)
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, 0.0]]))


# ---------------------------------------------------------------- GSPO


def test_gspo_sequence_ratio_values():
    # Seq 0: token log-ratios [0.1, 0.3] -> seq log-ratio 0.2, ratio e^0.2 = 1.2214 > 1.2,
    #        A=1 -> clipped to 1.2 on both tokens -> seq loss -1.2.
    # Seq 1: log-ratios [0.05, 5.0 (padding)] -> ratio e^0.05, A=2 -> seq loss -2 e^0.05.
    logps = torch.tensor([[0.1, 0.3], [0.05, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = policy_loss(logps, torch.zeros(2, 2), torch.tensor([1.0, 2.0]), mask,
                      PolicyLossConfig(importance_sampling_level='sequence'))
    expected = (-1.2 - 2.0 * math.exp(0.05)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    # Both tokens of seq 0 are high-clipped, out of 3 real tokens.
    assert out.metrics["clip_ratio_high"] == pytest.approx(2 / 3)
    # Token-level ratios differ: e^0.1 is unclipped there, so the losses must differ.
    token = policy_loss(logps, torch.zeros(2, 2), torch.tensor([1.0, 2.0]), mask)
    assert token.loss.item() == pytest.approx(
        (-(math.exp(0.1) + 1.2) / 2 - 2.0 * math.exp(0.05)) / 2
    )


def test_gspo_gradient_uses_sequence_ratio():
    # Log-ratios [0.1, -0.1] average to 0 -> s = 1. grpo loss = -(s + s)/2 * A, and each
    # token's gradient is -A * s / 2 = -0.5 (token level would give -e^{+-0.1} / 2).
    logps = torch.tensor([[0.1, -0.1]], requires_grad=True)
    out = policy_loss(logps, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2),
                      PolicyLossConfig(importance_sampling_level='sequence'))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.0)
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, -0.5]]))


# ---------------------------------------------------------------- KL and IS weights


def test_k3_kl_term_values_and_gradient():
    # ref - logps = [ln 2, 0] -> k3 = [2 - ln 2 - 1, 0]; A = 0 so only KL remains.
    logps = torch.tensor([[-LN2, -1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.0]])
    out = policy_loss(logps, logps.detach(), torch.tensor([0.0]), torch.ones(1, 2), PolicyLossConfig(beta=0.1),
                      ref_logps=ref)
    k3 = 2.0 - LN2 - 1.0
    assert out.loss.item() == pytest.approx(0.1 * k3 / 2, abs=1e-7)
    assert out.metrics["kl"] == pytest.approx(k3 / 2, abs=1e-6)
    out.loss.backward()
    # d k3 / d logp = 1 - e^{ref - logp} = -1 for token 0 -> pulls logp up towards ref.
    torch.testing.assert_close(logps.grad, torch.tensor([[0.1 * -1.0 / 2, 0.0]]))


def test_beta_without_ref_logps_is_an_error():
    logps, old, adv, mask = _on_policy_batch()
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, adv, mask, PolicyLossConfig(beta=0.1))


def test_is_weights_scale_policy_term_but_not_kl():
    # A=1 on-policy: per-token policy loss -w = [-0.5, -2]; KL (beta 0.1) [0.1 k3, 0].
    logps = torch.tensor([[-LN2, -1.0]])
    out = policy_loss(logps, logps.clone(), torch.tensor([1.0]), torch.ones(1, 2), PolicyLossConfig(beta=0.1),
                      is_weights=torch.tensor([[0.5, 2.0]]), ref_logps=torch.tensor([[0.0, -1.0]]))
    k3 = 2.0 - LN2 - 1.0
    assert out.loss.item() == pytest.approx((-0.5 + 0.1 * k3 - 2.0) / 2, abs=1e-6)
    assert out.metrics["is_ratio"] == pytest.approx(1.25)


# ---------------------------------------------------------------- gradient sanity


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_step_raises_logp_of_positive_advantage(loss_type, level):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    mask = torch.ones(2, 3)
    before = selective_log_softmax(logits, tokens).detach()
    out = policy_loss(selective_log_softmax(logits, tokens), before, torch.tensor([1.0, -1.0]), mask,
                      PolicyLossConfig(loss_type=loss_type, importance_sampling_level=level, max_completion_length=3))
    out.loss.backward()
    with torch.no_grad():
        after = selective_log_softmax(logits - 0.5 * logits.grad, tokens)
    assert (after[0] > before[0]).all()
    assert (after[1] < before[1]).all()


# ---------------------------------------------------------------- online DPO


def _dpo_inputs():
    # Policy log-ratios: chosen [0.2, 0.0], rejected [-0.3, 0.5] -> gap [0.5, -0.5].
    return (
        torch.tensor([-1.0, -2.0]),
        torch.tensor([-1.5, -1.0]),
        torch.tensor([-1.2, -2.0]),
        torch.tensor([-1.2, -1.5]),
    )


def test_dpo_sigmoid_values_and_metrics():
    out = online_dpo_loss(*_dpo_inputs(), beta=0.5)
    # logits = 0.5 * [0.5, -0.5]; loss = mean(log(1 + e^-0.25), log(1 + e^0.25)).
    assert out.loss.item() == pytest.approx((0.5759394 + 0.8259394) / 2, abs=1e-6)
    assert out.metrics["rewards/chosen"] == pytest.approx(0.05)  # mean(0.1, 0)
    assert out.metrics["rewards/rejected"] == pytest.approx(0.05)  # mean(-0.15, 0.25)
    assert out.metrics["rewards/margin"] == pytest.approx(0.0, abs=1e-7)
    assert out.metrics["rewards/accuracy"] == pytest.approx(0.5)


def test_dpo_ipo_values():
    # (gap - 1/(2 beta))^2 = (0.5 - 1)^2, (-0.5 - 1)^2 -> mean(0.25, 2.25).
    out = online_dpo_loss(*_dpo_inputs(), beta=0.5, loss_type="ipo")
    assert out.loss.item() == pytest.approx(1.25, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_step_widens_margin(loss_type):
    chosen, rejected, ref_c, ref_r = _dpo_inputs()
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)
    online_dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5, loss_type=loss_type).loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sigmoid, ipo"):
        online_dpo_loss(*_dpo_inputs(), beta=0.5, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        online_dpo_loss(*_dpo_inputs(), beta=0.0)


def test_dpo_pair_mask_averages_over_kept_pairs_only():
    # Only pair 0 counts: sigmoid loss log(1 + e^-0.25), its rewards 0.1 / -0.15, accuracy 1.
    out = online_dpo_loss(*_dpo_inputs(), beta=0.5, pair_mask=torch.tensor([1.0, 0.0]))
    assert out.loss.item() == pytest.approx(0.5759394, abs=1e-6)
    assert out.metrics["rewards/chosen"] == pytest.approx(0.1)
    assert out.metrics["rewards/rejected"] == pytest.approx(-0.15)
    assert out.metrics["rewards/accuracy"] == pytest.approx(1.0)
    chosen, rejected, ref_c, ref_r = _dpo_inputs()
    chosen.requires_grad_(True)
    online_dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5, pair_mask=torch.tensor([1.0, 0.0])).loss.backward()
    assert chosen.grad[1] == 0 and chosen.grad[0] < 0  # a masked pair gets no gradient


def test_dpo_all_pairs_masked_gives_zero_loss_with_a_graph():
    chosen, rejected, ref_c, ref_r = _dpo_inputs()
    chosen.requires_grad_(True)
    out = online_dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5, pair_mask=torch.zeros(2))
    assert out.loss.item() == 0.0
    out.loss.backward()  # still differentiable: every DDP rank must run backward
    assert (chosen.grad == 0).all()
