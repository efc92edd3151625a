"""Soft-label Bradley-Terry (soft_reward) and soft-label DPO (soft_dpo) on hand-derived numbers.

Both are p softplus(-x) + (1 - p) softplus(x) per pair, x the preference log-odds (d = r_c - r_r for the
reward model, beta * D for DPO). Since softplus(x) = x + softplus(-x), this is softplus(-x) + (1 - p) x,
whose derivative in x is sigma(x) - p: p = 1 is the hard loss, and the minimum is at x = log(p / (1 - p)).
"""

import math

import pytest
import torch

import losses
from losses import (
    bind_objective,
    dpo_loss,
    get_objective,
    pair_fields,
    pairwise_reward_loss,
    soft_dpo_loss,
    soft_preference_nll,
    soft_reward_loss,
)

F64 = torch.float64


def t(*values):
    return torch.tensor(values, dtype=F64)


def softplus(x):
    return math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# Rewards: d = r_c - r_r = (1, -2).
CHOSEN, REJECTED = t(1.0, 0.0), t(0.0, 2.0)
# DPO pairs of tests/losses/test_dpo.py: D = (1, -2), so beta = 0.5 gives x = beta * D = (0.5, -1).
PAIRS = (t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0))


def test_soft_reward_with_certain_labels_is_the_bradley_terry_loss():
    hard, hard_metrics = pairwise_reward_loss(CHOSEN, REJECTED)
    soft, soft_metrics = soft_reward_loss(CHOSEN, REJECTED, soft_label=t(1.0, 1.0))
    unlabelled, _ = soft_reward_loss(CHOSEN, REJECTED)
    assert soft.item() == pytest.approx((softplus(-1) + softplus(2)) / 2, rel=1e-15)
    assert torch.equal(soft, hard) and torch.equal(unlabelled, hard)
    assert all(torch.equal(soft_metrics[k], v) for k, v in hard_metrics.items())
    assert soft_metrics["labels/soft_label"].item() == 1.0


def test_soft_reward_at_one_half_by_hand():
    """p = 0.5: softplus(-d) + d / 2 per pair: d = 1 gives softplus(-1) + 0.5 = 0.8132617,
    d = -2 gives softplus(2) - 1 = 1.1269280; the mean is 0.9700949. Swapping chosen and rejected changes
    nothing (d -> -d: softplus(d) - d/2 = softplus(-d) + d/2)."""
    loss, metrics = soft_reward_loss(CHOSEN, REJECTED, soft_label=t(0.5, 0.5))
    want = ((softplus(-1) + 0.5) + (softplus(2) - 1.0)) / 2
    assert want == pytest.approx(0.9700949, abs=1e-7)
    assert loss.item() == pytest.approx(want, rel=1e-14)
    swapped, _ = soft_reward_loss(REJECTED, CHOSEN, soft_label=t(0.5, 0.5))
    assert swapped.item() == pytest.approx(want, rel=1e-14)
    assert metrics["labels/soft_label"].item() == 0.5
    # a tie costs log 2 at p = 0.5, as in the hard loss
    tie, _ = soft_reward_loss(t(0.3), t(0.3), soft_label=t(0.5))
    assert tie.item() == pytest.approx(math.log(2), rel=1e-15)


def test_soft_reward_per_pair_labels_margin_and_centring_by_hand():
    """p = (0.8, 0.25), margin (1, 0): x = d - m = (0, -2). Pair 0: softplus(0) + 0.2 * 0 = log 2; pair 1:
    softplus(2) + 0.75 * (-2) = 2.1269280 - 1.5. center_coef 0.1 adds 0.1 * mean(1^2, 2^2) = 0.25."""
    p, margin = t(0.8, 0.25), t(1.0, 0.0)
    loss, _ = soft_reward_loss(CHOSEN, REJECTED, soft_label=p, margin=margin)
    want = (math.log(2) + softplus(2) - 1.5) / 2
    assert loss.item() == pytest.approx(want, rel=1e-14)
    centred, _ = soft_reward_loss(CHOSEN, REJECTED, soft_label=p, margin=margin, center_coef=0.1)
    assert centred.item() == pytest.approx(want + 0.25, rel=1e-14)


def test_soft_reward_gradient_is_sigmoid_minus_p_and_vanishes_at_the_log_odds():
    """d loss / d r_c = (sigma(d) - p) / B; with d = log(p / (1 - p)) it is 0."""
    chosen, rejected = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    loss, _ = soft_reward_loss(chosen, rejected, soft_label=t(0.8, 0.8))
    loss.backward()
    want = t(sigmoid(1.0) - 0.8, sigmoid(-2.0) - 0.8) / 2
    torch.testing.assert_close(chosen.grad, want, rtol=1e-13, atol=0)
    torch.testing.assert_close(rejected.grad, -want, rtol=1e-13, atol=0)
    at_optimum = t(math.log(0.8 / 0.2)).requires_grad_()
    soft_reward_loss(at_optimum, t(0.0), soft_label=t(0.8))[0].backward()
    assert abs(at_optimum.grad.item()) < 1e-15


def test_soft_dpo_limits_and_cdpo_equivalence():
    """p = 1 is DPO; a constant p = 1 - e is cDPO with label_smoothing e; the metrics are DPO's."""
    plain, plain_metrics = dpo_loss(*PAIRS, beta=0.5)
    soft, soft_metrics = soft_dpo_loss(*PAIRS, beta=0.5, soft_label=t(1.0, 1.0))
    assert soft.item() == pytest.approx((softplus(-0.5) + softplus(1.0)) / 2, rel=1e-15)
    assert torch.equal(soft, plain)
    assert torch.equal(soft_dpo_loss(*PAIRS, beta=0.5)[0], plain)
    assert all(torch.equal(soft_metrics[k], v) for k, v in plain_metrics.items())
    cdpo, _ = dpo_loss(*PAIRS, beta=0.5, label_smoothing=0.1)
    assert soft_dpo_loss(*PAIRS, beta=0.5, soft_label=t(0.9, 0.9))[0].item() == pytest.approx(cdpo.item(), rel=1e-15)


def test_soft_dpo_at_one_half_and_per_pair_by_hand():
    """x = (0.5, -1). p = 0.5: softplus(-x) + x / 2 = (softplus(-0.5) + 0.25, softplus(1) - 0.5) =
    (0.7240770, 0.8132617), mean 0.7686693. p = (1, 0.5): (softplus(-0.5), softplus(1) - 0.5)."""
    half, metrics = soft_dpo_loss(*PAIRS, beta=0.5, soft_label=t(0.5, 0.5))
    want = ((softplus(-0.5) + 0.25) + (softplus(1.0) - 0.5)) / 2
    assert want == pytest.approx(0.7686693, abs=1e-7)
    assert half.item() == pytest.approx(want, rel=1e-14)
    assert metrics["labels/soft_label"].item() == 0.5
    mixed, _ = soft_dpo_loss(*PAIRS, beta=0.5, soft_label=t(1.0, 0.5))
    assert mixed.item() == pytest.approx((softplus(-0.5) + softplus(1.0) - 0.5) / 2, rel=1e-14)


def test_soft_dpo_gradient_by_hand():
    """d/d pi_c of the mean loss is beta (sigma(beta D) - p) / B, the opposite for pi_r and ref_c."""
    pc, pr, rc, rr = (x.clone().requires_grad_() for x in PAIRS)
    p = t(0.7, 0.6)
    soft_dpo_loss(pc, pr, rc, rr, beta=0.5, soft_label=p)[0].backward()
    want = 0.5 * (torch.sigmoid(t(0.5, -1.0)) - p) / 2
    torch.testing.assert_close(pc.grad, want, rtol=1e-13, atol=0)
    torch.testing.assert_close(pr.grad, -want, rtol=1e-13, atol=0)
    torch.testing.assert_close(rc.grad, -want, rtol=1e-13, atol=0)


def test_gradcheck_and_low_precision():
    gen = torch.Generator().manual_seed(0)
    logps = [torch.randn(5, generator=gen, dtype=F64).requires_grad_() for _ in range(4)]
    p = torch.rand(5, generator=gen, dtype=F64)
    assert torch.autograd.gradcheck(lambda *x: soft_dpo_loss(*x, beta=0.3, soft_label=p)[0], logps)
    assert torch.autograd.gradcheck(lambda c, r: soft_reward_loss(c, r, soft_label=p, center_coef=0.1)[0], logps[:2])
    loss, metrics = soft_dpo_loss(*(x.detach().to(torch.bfloat16) for x in logps), beta=0.3,
                                  soft_label=p.to(torch.bfloat16))
    assert loss.dtype == torch.float32 and metrics["labels/soft_label"].dtype == torch.float32
    # the per-pair form, against the cross-entropy as the papers write it, in float64
    x = torch.randn(7, generator=gen, dtype=F64)
    q = torch.rand(7, generator=gen, dtype=F64)
    oracle = -(q * torch.log(torch.sigmoid(x)) + (1 - q) * torch.log(torch.sigmoid(-x)))
    torch.testing.assert_close(soft_preference_nll(x, q), oracle, rtol=1e-12, atol=0)


def test_registered_and_the_soft_label_comes_from_the_data_only():
    assert get_objective("soft_reward").fn is losses.soft_reward_loss
    assert get_objective("soft_dpo").fn is losses.soft_dpo_loss
    assert (get_objective("soft_dpo").family, get_objective("soft_dpo").needs_reference) == ("pairwise", True)
    assert pair_fields(get_objective("soft_dpo")) == ("soft_label",)
    assert pair_fields(get_objective("soft_reward")) == ("margin", "soft_label")
    assert pair_fields(get_objective("reward")) == ("margin",)
    assert pair_fields(get_objective("dpo")) == ()
    with pytest.raises(ValueError, match="'soft_label' is read per pair from the data"):
        bind_objective("soft_dpo", {"beta": 0.1, "soft_label": 0.9})
    with pytest.raises(ValueError, match="beta must be a number > 0"):
        bind_objective("soft_dpo", {"beta": 0.0})
