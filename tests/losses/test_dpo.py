"""DPO, conservative DPO, IPO and the hinge loss on hand-derived numbers and limit cases."""

import math

import pytest
import torch

from losses import dpo_loss, hinge_loss, ipo_loss

F64 = torch.float64


def t(*values):
    return torch.tensor(values, dtype=F64)


def softplus(x):
    return math.log1p(math.exp(x))


# Pair 0: chosen log-ratio -1 - (-1.5) = 0.5, rejected -2 - (-1.5) = -0.5, so D = 1.
# Pair 1: chosen log-ratio -3 - (-2) = -1, rejected -1 - (-2) = 1, so D = -2.
PAIRS = (t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0))


def test_dpo_by_hand():
    """beta 0.5: beta*D = (0.5, -1); loss = mean(softplus(-0.5), softplus(1)).

    Rewards beta*(pi - ref): chosen (0.25, -0.5), rejected (-0.25, 0.5); pair 0 is ranked
    right and pair 1 wrong, so accuracy 1/2 and mean margin (0.5 + -1) / 2 = -0.25.
    """
    loss, metrics = dpo_loss(*PAIRS, beta=0.5)
    assert loss.item() == pytest.approx((softplus(-0.5) + softplus(1.0)) / 2, rel=1e-12)
    assert metrics["rewards/chosen"].item() == pytest.approx(-0.125, rel=1e-12)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.125, rel=1e-12)
    assert metrics["rewards/margins"].item() == pytest.approx(-0.25, rel=1e-12)
    assert metrics["rewards/accuracies"].item() == 0.5
    assert metrics["logps/chosen"].item() == -2.0
    assert metrics["logps/rejected"].item() == -1.5
    assert all(not v.requires_grad for v in metrics.values())


def test_dpo_gradient_by_hand():
    """d/d pi_c of softplus(-beta D)/B is -beta * sigmoid(-beta D) / B, and the opposite for pi_r."""
    pc, pr, rc, rr = (x.clone().requires_grad_() for x in PAIRS)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    loss.backward()
    sig = torch.sigmoid(-0.5 * t(1.0, -2.0))
    torch.testing.assert_close(pc.grad, -0.5 * sig / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(pr.grad, 0.5 * sig / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(rc.grad, 0.5 * sig / 2, rtol=1e-12, atol=0)


def test_conservative_dpo_by_hand_and_zero_smoothing_is_plain_dpo():
    """e = 0.1: mean over pairs of 0.9 softplus(-beta D) + 0.1 softplus(beta D)."""
    loss, _ = dpo_loss(*PAIRS, beta=0.5, label_smoothing=0.1)
    want = sum(0.9 * softplus(-z) + 0.1 * softplus(z) for z in (0.5, -1.0)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12)
    plain, plain_metrics = dpo_loss(*PAIRS, beta=0.5)
    zero, zero_metrics = dpo_loss(*PAIRS, beta=0.5, label_smoothing=0.0)
    assert torch.equal(plain, zero)
    assert all(torch.equal(plain_metrics[k], zero_metrics[k]) for k in plain_metrics)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_policy_equal_to_reference(beta):
    """D = 0: DPO gives log 2 (any smoothing), the hinge 1, IPO (0 - 1/(2 beta))^2 = 1/(4 beta^2)."""
    logps = t(-3.0, -7.5, -0.25)
    same = (logps, logps - 1, logps, logps - 1)
    assert dpo_loss(*same, beta=beta)[0].item() == pytest.approx(math.log(2), rel=1e-15)
    assert dpo_loss(*same, beta=beta, label_smoothing=0.3)[0].item() == pytest.approx(math.log(2), rel=1e-15)
    assert hinge_loss(*same, beta=beta)[0].item() == 1.0
    assert ipo_loss(*same, beta=beta)[0].item() == pytest.approx(1 / (4 * beta**2), rel=1e-15)
    assert dpo_loss(*same, beta=beta)[1]["rewards/accuracies"].item() == 0.0


def test_ipo_by_hand():
    """beta 0.25, target 1/(2 beta) = 2: D = (1, -2) gives ((1 - 2)^2 + (-2 - 2)^2) / 2 = 8.5."""
    loss, metrics = ipo_loss(*PAIRS, beta=0.25)
    assert loss.item() == 8.5
    assert metrics["rewards/chosen"].item() == pytest.approx(0.25 * -0.25, rel=1e-15)


def test_hinge_by_hand():
    """beta 0.5: 1 - beta D = (0.5, 2), relu keeps both, mean 1.25; beta 2: (1 - 2, 1 + 4) -> (0, 5), 2.5."""
    assert hinge_loss(*PAIRS, beta=0.5)[0].item() == 1.25
    assert hinge_loss(*PAIRS, beta=2.0)[0].item() == 2.5


@pytest.mark.parametrize(
    "fn,kwargs",
    [
        (dpo_loss, {"beta": 0.3}),
        (dpo_loss, {"beta": 0.3, "label_smoothing": 0.2}),
        (ipo_loss, {"beta": 0.3}),
        (hinge_loss, {"beta": 0.3}),
    ],
)
def test_gradcheck(fn, kwargs):
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(5, generator=gen, dtype=F64).requires_grad_() for _ in range(4))
    assert torch.autograd.gradcheck(lambda *x: fn(*x, **kwargs)[0], inputs)


@pytest.mark.parametrize("fn", [dpo_loss, ipo_loss, hinge_loss])
def test_mean_over_pairs_splits_into_equal_halves(fn):
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(8, generator=gen, dtype=F64) for _ in range(4)]
    full = fn(*inputs, beta=0.2)[0]
    halves = [fn(*(x[s] for x in inputs), beta=0.2)[0] for s in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, full, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fn", [dpo_loss, ipo_loss, hinge_loss])
def test_low_precision_inputs_are_computed_in_fp32(fn):
    bf16 = [x.to(torch.bfloat16) for x in PAIRS]
    loss, metrics = fn(*bf16, beta=0.5)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
    assert torch.equal(loss, fn(*(x.float() for x in bf16), beta=0.5)[0])
    assert fn(*PAIRS, beta=0.5)[0].dtype == F64
