"""KL estimators, KL-shaped rewards (against a plain-loop oracle) and the KL coefficient controllers."""

import math

import pytest
import torch

from losses import AdaptiveKLController, FixedKLController, kl_penalty, kl_shaped_rewards

F64 = torch.float64


def shaped_rewards_oracle(scores, logprobs, ref_logprobs, mask, kl_coef, estimator):
    """Plain Python: -kl_coef * k per valid token, the score added on the last valid one."""
    rewards, kls = [], []
    for score, lp_row, ref_row, m_row in zip(scores, logprobs, ref_logprobs, mask):
        r_row, k_row = [], []
        for lp, ref, m in zip(lp_row, ref_row, m_row):
            x = lp - ref
            k = {"k1": x, "k2": x * x / 2, "k3": math.exp(-x) - 1 + x}[estimator] if m else 0.0
            k_row.append(k)
            r_row.append(-kl_coef * k if m else 0.0)
        last = max((i for i, m in enumerate(m_row) if m), default=None)
        if last is not None:
            r_row[last] += score
        rewards.append(r_row)
        kls.append(k_row)
    return rewards, kls


def test_estimators_by_hand():
    """x = logprobs - ref = (0.5, -0.5, 0): k1 = x, k2 = x^2/2 = (0.125, 0.125, 0), k3 = e^-x - 1 + x."""
    logprobs = torch.tensor([[-1.0, -1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -0.5, -2.0]], dtype=F64)
    torch.testing.assert_close(kl_penalty(logprobs, ref), torch.tensor([[0.5, -0.5, 0.0]], dtype=F64))
    torch.testing.assert_close(
        kl_penalty(logprobs, ref, estimator="k2"), torch.tensor([[0.125, 0.125, 0.0]], dtype=F64)
    )
    k3 = torch.tensor([[math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5, 0.0]], dtype=F64)
    torch.testing.assert_close(kl_penalty(logprobs, ref, estimator="k3"), k3, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logprobs, ref, estimator="k4")


def test_k3_keeps_its_precision_for_tiny_log_ratios():
    """k3 = e^-x - 1 + x = x^2/2 - x^3/6 + ...; at x = 1e-8 that is 5e-17, which e^-x - 1 would round away."""
    x = torch.tensor([[1e-8, -1e-8, 1e-5]], dtype=F64)
    want = x.square() / 2 - x**3 / 6 + x**4 / 24
    got = kl_penalty(x, torch.zeros_like(x), estimator="k3")
    torch.testing.assert_close(got, want, rtol=1e-7, atol=0)


def test_estimators_are_unbiased_where_the_literature_says():
    """For pi = (0.6, 0.4) and ref = (0.5, 0.5), E_pi[k1] = E_pi[k3] = KL(pi || ref) exactly."""
    pi, ref = torch.tensor([[0.6, 0.4]], dtype=F64), torch.tensor([[0.5, 0.5]], dtype=F64)
    kl = (pi * (pi / ref).log()).sum().item()
    for estimator in ("k1", "k3"):
        k = kl_penalty(pi.log(), ref.log(), estimator=estimator)
        assert (pi * k).sum().item() == pytest.approx(kl, rel=1e-14)
    assert (kl_penalty(pi.log(), ref.log(), estimator="k3") >= 0).all()


def test_shaped_rewards_by_hand():
    """kl_coef 0.1, x = (0.5, -0.5), score 2 on the last valid token: rewards (-0.05, 0.05 + 2, 0)."""
    scores = torch.tensor([2.0], dtype=F64)
    logprobs = torch.tensor([[-1.0, -1.0, 1000.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -0.5, -1000.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    rewards, kl = kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 2.05, 0.0]], dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -0.5, 0.0]], dtype=F64))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_shaped_rewards_match_plain_loop_oracle(estimator):
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 6, generator=gen, dtype=F64) * 2
    ref = -torch.rand(4, 6, generator=gen, dtype=F64) * 2
    scores = torch.randn(4, generator=gen, dtype=F64)
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 0, 1])[:, None]
    logprobs = torch.where(mask, logprobs, 1000.0)
    ref = torch.where(mask, ref, -1000.0)
    rewards, kl = kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.05, estimator=estimator)
    want_rewards, want_kl = shaped_rewards_oracle(
        scores.tolist(), logprobs.tolist(), ref.tolist(), mask.tolist(), 0.05, estimator
    )
    torch.testing.assert_close(rewards, torch.tensor(want_rewards, dtype=F64), rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(kl, torch.tensor(want_kl, dtype=F64), rtol=1e-10, atol=1e-15)
    assert (rewards[2] == 0).all()


def test_shaped_rewards_accept_a_tensor_coefficient_and_gradcheck():
    gen = torch.Generator().manual_seed(1)
    logprobs = (-torch.rand(2, 4, generator=gen, dtype=F64)).requires_grad_()
    ref = (-torch.rand(2, 4, generator=gen, dtype=F64)).requires_grad_()
    scores = torch.randn(2, generator=gen, dtype=F64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.autograd.gradcheck(
        lambda s, lp, r: kl_shaped_rewards(
            s, lp, r, mask, kl_coef=torch.tensor(0.3, dtype=F64), estimator="k3"
        )[0],
        (scores, logprobs, ref),
    )


def test_adaptive_controller_by_hand():
    """init 0.2, target 6, horizon 10000, 256 steps per update.

    KL 8: 8/6 - 1 = 1/3 clipped to 0.2 -> 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024.
    KL 6.6: error 0.1 -> multiply by 1 + 0.1 * 0.0256 = 1.00256. KL 0: error -1 clipped to -0.2.
    """
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(8.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024, rel=1e-14)
    ctl.update(torch.tensor(6.6), n_steps=256)
    assert ctl.value == pytest.approx(0.201024 * 1.00256, rel=1e-6)
    before = ctl.value
    ctl.update(0.0, n_steps=256)
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 0.0256), rel=1e-14)
    restored = AdaptiveKLController(1.0, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05
