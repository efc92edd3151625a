"""GAE against hand numbers and a plain-loop oracle; PPO policy and value losses likewise."""

import math

import pytest
import torch

from losses import gae, ppo_policy_loss, ppo_value_loss

F64 = torch.float64


def gae_oracle(rewards, values, mask, gamma, lam):
    """Plain Python over each row's valid prefix; V after the last valid token is 0."""
    advantages, returns = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        n = sum(1 for m in m_row if m)
        adv = [0.0] * len(r_row)
        last = 0.0
        for t in reversed(range(n)):
            next_value = v_row[t + 1] if t + 1 < n else 0.0
            delta = r_row[t] + gamma * next_value - v_row[t]
            last = delta + gamma * lam * last
            adv[t] = last
        advantages.append(adv)
        returns.append([a + v if t < n else 0.0 for t, (a, v) in enumerate(zip(adv, v_row))])
    return advantages, returns


def ppo_oracle(logprobs, old_logprobs, advantages, mask, eps):
    """Plain Python: token-weighted mean of max(-A r, -A clip(r)), clip fraction, 0.5 mean log-ratio^2."""
    total, clipped, sq, count = 0.0, 0, 0.0, 0
    for lp_row, old_row, a_row, m_row in zip(logprobs, old_logprobs, advantages, mask):
        for lp, old, a, m in zip(lp_row, old_row, a_row, m_row):
            if not m:
                continue
            ratio = math.exp(lp - old)
            unclipped, clip = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            total += max(unclipped, clip)
            clipped += clip > unclipped
            sq += (lp - old) ** 2
            count += 1
    return total / count, clipped / count, 0.5 * sq / count


def value_oracle(values, old_values, returns, mask, eps):
    total, clipped, count = 0.0, 0, 0
    for v_row, o_row, r_row, m_row in zip(values, old_values, returns, mask):
        for v, o, r, m in zip(v_row, o_row, r_row, m_row):
            if not m:
                continue
            v_clip = o + min(max(v - o, -eps), eps)
            total += max((v - r) ** 2, (v_clip - r) ** 2)
            clipped += (v_clip - r) ** 2 > (v - r) ** 2
            count += 1
    return 0.5 * total / count, clipped / count


def test_gae_by_hand():
    """gamma = lam = 0.5, rewards (0, 0, 1), values 0.5 each, one padded slot with junk.

    delta_2 = 1 + 0.5*0 - 0.5 = 0.5; delta_1 = 0 + 0.25 - 0.5 = -0.25; delta_0 = -0.25.
    A_2 = 0.5, A_1 = -0.25 + 0.25 * 0.5 = -0.125, A_0 = -0.25 + 0.25 * -0.125 = -0.28125.
    Returns A + V = (0.21875, 0.375, 1.0), and 0 on the padding.
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0, 1000.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.5, 0.5, -1000.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert advantages.tolist() == [[-0.28125, -0.125, 0.5, 0.0]]
    assert returns.tolist() == [[0.21875, 0.375, 1.0, 0.0]]


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.25, 4.0]], dtype=F64)
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[5.5, 4.75, -1.0]]
    assert returns.tolist() == [[6.0, 5.0, 3.0]]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_gae_matches_plain_loop_oracle(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 8, generator=gen, dtype=F64)
    values = torch.randn(5, 8, generator=gen, dtype=F64)
    mask = torch.arange(8)[None] < torch.tensor([8, 5, 1, 0, 3])[:, None]
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = gae_oracle(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(want_adv, dtype=F64), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(returns, torch.tensor(want_ret, dtype=F64), rtol=1e-10, atol=1e-14)


def test_gae_gradcheck():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(2, 4, generator=gen, dtype=F64, requires_grad=True)
    values = torch.randn(2, 4, generator=gen, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda r, v: gae(r, v, mask, gamma=0.9, lam=0.8), (rewards, values))


def test_ppo_policy_by_hand():
    """eps 0.2, four tokens (one padded):
    A = 1, ratio 1.5: -1.5 vs clipped -1.2 -> -1.2 (clipped).
    A = -2, ratio 0.5: 1.0 vs clipped 1.6 -> 1.6 (clipped).
    A = 1, ratio 0.5: -0.5 vs clipped -0.8 -> -0.5 (the pessimistic unclipped term).
    Loss (-1.2 + 1.6 - 0.5) / 3 = -0.1/3; clipfrac 2/3; approx_kl 0.5 * (ln^2 1.5 + 2 ln^2 2) / 3.
    """
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(0.5), 1000.0]], dtype=F64)
    old = torch.zeros(2, 2, dtype=F64)
    advantages = torch.tensor([[1.0, -2.0], [1.0, 1000.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, mask, clip_coef=0.2)
    assert loss.item() == pytest.approx(-0.1 / 3, rel=1e-12)
    assert metrics["policy/clipfrac"].item() == pytest.approx(2 / 3, rel=1e-15)
    want_kl = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(2) ** 2) / 3
    assert metrics["policy/approx_kl"].item() == pytest.approx(want_kl, rel=1e-14)
    assert metrics["policy/ratio"].item() == pytest.approx(2.5 / 3, rel=1e-14)


def test_ppo_clip_inactive_at_ratio_one():
    """ratio 1: loss = -mean(A) over valid tokens, nothing clipped, approx_kl 0, gradient -A / n."""
    advantages = torch.tensor([[0.5, -1.5, 3.0], [2.0, 7.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logprobs = torch.full((2, 3), -0.7, dtype=F64, requires_grad=True)
    loss, metrics = ppo_policy_loss(logprobs, logprobs.detach(), advantages, mask, clip_coef=0.1)
    assert loss.item() == pytest.approx(-(0.5 - 1.5 + 3.0 + 2.0) / 4, rel=1e-15)
    assert metrics["policy/clipfrac"].item() == 0.0 and metrics["policy/approx_kl"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(
        logprobs.grad, torch.where(mask.bool(), -advantages / 4, 0), rtol=1e-15, atol=0
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_matches_plain_loop_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(4, 6, generator=gen, dtype=F64) * 2
    old = logprobs + torch.randn(4, 6, generator=gen, dtype=F64) * 0.3
    advantages = torch.randn(4, 6, generator=gen, dtype=F64)
    mask = torch.arange(6)[None] < torch.tensor([6, 4, 1, 2])[:, None]
    loss, metrics = ppo_policy_loss(logprobs, old, advantages, mask, clip_coef=0.2)
    want_loss, want_clip, want_kl = ppo_oracle(
        logprobs.tolist(), old.tolist(), advantages.tolist(), mask.tolist(), 0.2
    )
    assert loss.item() == pytest.approx(want_loss, rel=1e-10)
    assert metrics["policy/clipfrac"].item() == pytest.approx(want_clip, rel=1e-12)
    assert metrics["policy/approx_kl"].item() == pytest.approx(want_kl, rel=1e-10)

    values = torch.randn(4, 6, generator=gen, dtype=F64)
    old_values = values + torch.randn(4, 6, generator=gen, dtype=F64) * 0.3
    returns = torch.randn(4, 6, generator=gen, dtype=F64)
    vf_loss, vf_metrics = ppo_value_loss(values, old_values, returns, mask, clip_coef=0.2)
    want_vf, want_vclip = value_oracle(
        values.tolist(), old_values.tolist(), returns.tolist(), mask.tolist(), 0.2
    )
    assert vf_loss.item() == pytest.approx(want_vf, rel=1e-10)
    assert vf_metrics["val/clipfrac"].item() == pytest.approx(want_vclip, rel=1e-12)


def test_value_loss_by_hand():
    """eps 0.2. V 1.5, V_old 1, R 2: clipped V 1.2; max(0.25, 0.64) = 0.64 (clipped).
    V 1.1, V_old 1, R 0: inside the range, 1.21. Loss 0.5 * (0.64 + 1.21) / 2 = 0.4625; clipfrac 1/2.
    """
    values = torch.tensor([[1.5, 1.1, 99.0]], dtype=F64)
    old_values = torch.tensor([[1.0, 1.0, -99.0]], dtype=F64)
    returns = torch.tensor([[2.0, 0.0, 1e300]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    loss, metrics = ppo_value_loss(values, old_values, returns, mask, clip_coef=0.2)
    assert loss.item() == pytest.approx(0.4625, rel=1e-14)
    assert metrics["val/clipfrac"].item() == 0.5
    assert metrics["val/vpred"].item() == pytest.approx(1.3, rel=1e-15)


def test_value_clip_inactive_when_values_equal_old_values():
    """V = V_old: loss = 0.5 * mean (V - R)^2 and no clipping."""
    values = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    returns = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64)
    loss, metrics = ppo_value_loss(values, values, returns, torch.ones(1, 3), clip_coef=0.2)
    assert loss.item() == pytest.approx(0.5 * 14 / 3, rel=1e-15)
    assert metrics["val/clipfrac"].item() == 0.0


def test_ppo_gradcheck():
    gen = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logprobs = (-torch.rand(2, 4, generator=gen, dtype=F64)).requires_grad_()
    # Log-ratios of 0.05 and 0.5 stay away from the clip edges ln(1.2) and ln(0.8), where the loss has kinks.
    old = logprobs.detach() - torch.tensor([[0.05, 0.5, -0.5, 0.0], [0.05, -0.05, 0.0, 0.0]], dtype=F64)
    advantages = torch.randn(2, 4, generator=gen, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda lp, a: ppo_policy_loss(lp, old, a, mask, clip_coef=0.2)[0], (logprobs, advantages)
    )
    values = torch.randn(2, 4, generator=gen, dtype=F64).requires_grad_()
    old_values = values.detach() + torch.tensor([[0.05, 0.5, -0.5, 0.0], [0.05, -0.05, 0.0, 0.0]], dtype=F64)
    returns = torch.randn(2, 4, generator=gen, dtype=F64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v, r: ppo_value_loss(v, old_values, r, mask, clip_coef=0.2)[0], (values, returns)
    )
