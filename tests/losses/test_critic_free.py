"""The critic-free family: advantage estimators, the clipped policy loss and its aggregations, the
overlong penalty, and their registries, against numbers derived by hand in each docstring."""

import inspect
import math

import pytest
import torch

import losses
from losses import (
    aggregate,
    aggregation_count,
    aggregation_unit,
    bind_objective,
    clipped_policy_loss,
    dr_grpo_advantages,
    gae,
    gae_advantages,
    get_advantage,
    get_objective,
    grpo_advantages,
    list_advantages,
    ppo_policy_loss,
    register_advantage,
    reinforce_pp_advantages,
    rloo_advantages,
    soft_overlong_penalty,
)

F64 = torch.float64
EPS = 1e-6  # the estimators' default eps
JUNK = 1000.0


def lengths_mask(lengths, width):
    return torch.arange(width)[None] < torch.tensor(lengths)[:, None]


def score_rewards(scores, lengths, width):
    """Per-token rewards with each score on the row's last valid token and junk on the padding."""
    mask = lengths_mask(lengths, width)
    rewards = torch.where(mask, 0.0, JUNK).to(F64)
    for row, (score, n) in enumerate(zip(scores, lengths)):
        if n:
            rewards[row, n - 1] = score
    return rewards, mask


def per_row(advantages, mask):
    """The one value each valid row carries on all its valid tokens (0 for an empty row), checking padding is 0."""
    assert torch.all(advantages[~mask] == 0)
    values = []
    for row, row_mask in zip(advantages, mask):
        valid = row[row_mask]
        assert torch.all(valid == valid[0]) if len(valid) else True
        values.append(valid[0].item() if len(valid) else 0.0)
    return values


# --- advantage estimators ---------------------------------------------------------------------------------


def test_group_estimators_by_hand_with_a_tie_and_mixed_lengths():
    """Two groups of G = 4, scores (1, 0, 1, 0) and (1, 1, 1, 1), response lengths 3, 1, 2, 3, 2, 3, 1, 2.

    Group 1: mean 1/2, deviations +-1/2, Bessel variance (4 * 1/4) / 3 = 1/3, std 1/sqrt(3).
      grpo:    +-(1/2) / (1/sqrt(3) + eps) = +-0.866...
      dr_grpo: +-1/2
      rloo:    1 - (0 + 1 + 0) / 3 = 2/3 and 0 - (1 + 1 + 0) / 3 = -2/3
    Group 2 (all solved): every estimator gives 0, grpo's 0 / (0 + eps) included.
    """
    rewards, mask = score_rewards([1, 0, 1, 0, 1, 1, 1, 1], [3, 1, 2, 3, 2, 3, 1, 2], 3)
    a = 0.5 / (1 / math.sqrt(3) + EPS)
    want = {
        grpo_advantages: [a, -a, a, -a, 0, 0, 0, 0],
        dr_grpo_advantages: [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0],
        rloo_advantages: [2 / 3, -2 / 3, 2 / 3, -2 / 3, 0, 0, 0, 0],
    }
    for fn, expected in want.items():
        advantages, returns, metrics = fn(rewards, mask, group_size=4)
        assert returns is None
        assert per_row(advantages, mask) == pytest.approx(expected, rel=1e-12, abs=1e-15), fn.__name__
        assert metrics["advantages/zero_std_groups"].item() == 0.5
        assert not metrics["advantages/mean"].requires_grad


def test_sequence_reward_is_the_sum_of_the_per_token_rewards():
    """KL shaping on every token: row 0 has rewards (-0.25, -0.25, 1), r = 0.5; row 1 (-0.5, 0), r = -0.5.
    G = 2: mean 0, Bessel std sqrt(0.25 + 0.25) = sqrt(1/2); grpo +-0.5 / (sqrt(1/2) + eps); dr_grpo +-0.5;
    rloo 0.5 - (-0.5) = 1 and -1."""
    rewards = torch.tensor([[-0.25, -0.25, 1.0], [-0.5, 0.0, JUNK]], dtype=F64)
    mask = lengths_mask([3, 2], 3)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    assert per_row(grpo_advantages(rewards, mask, group_size=2)[0], mask) == pytest.approx([a, -a], rel=1e-12)
    assert per_row(dr_grpo_advantages(rewards, mask, group_size=2)[0], mask) == [0.5, -0.5]
    assert per_row(rloo_advantages(rewards, mask, group_size=2)[0], mask) == [1.0, -1.0]


def test_a_skipped_row_is_left_out_of_its_group():
    """Group (1, 0, skipped, 0): the skipped row (mask all False, junk reward) is not counted, n = 3.
    mean 1/3, deviations 2/3, -1/3, -1/3, Bessel variance (4/9 + 1/9 + 1/9) / 2 = 1/3.
      grpo:    (2/3, -1/3, -1/3) / (1/sqrt(3) + eps)
      dr_grpo: 2/3, -1/3, -1/3
      rloo:    1 - (0 + 0) / 2 = 1, 0 - (1 + 0) / 2 = -1/2, -1/2
    and the skipped row gets 0. The same as the group of three without it.
    """
    rewards, mask = score_rewards([1, 0, 77, 0], [2, 3, 0, 1], 3)
    rewards[2] = 5.0  # a skipped row's rewards are never read
    s = 1 / math.sqrt(3) + EPS
    want = {
        grpo_advantages: [2 / 3 / s, -1 / 3 / s, 0, -1 / 3 / s],
        dr_grpo_advantages: [2 / 3, -1 / 3, 0, -1 / 3],
        rloo_advantages: [1, -0.5, 0, -0.5],
    }
    keep = torch.tensor([0, 1, 3])
    for fn, expected in want.items():
        advantages = fn(rewards, mask, group_size=4)[0]
        assert per_row(advantages, mask) == pytest.approx(expected, rel=1e-12, abs=1e-15), fn.__name__
        assert torch.all(advantages[2] == 0)
        without = fn(rewards[keep], mask[keep], group_size=3)[0]
        torch.testing.assert_close(advantages[keep], without, rtol=1e-15, atol=0)


def test_a_group_with_one_valid_row_gives_zero():
    """No other response to compare with: grpo's std is 0 (so 0 / eps), dr_grpo's r - r, rloo's defined as 0."""
    # groups of 2: (3, skipped), (skipped, 1), (2, 3); the skipped rows' 9 is never read
    rewards, mask = score_rewards([3, 9, 9, 1, 2, 3], [2, 0, 0, 1, 1, 2], 2)
    for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
        rows = per_row(fn(rewards, mask, group_size=2)[0], mask)
        assert rows[:4] == [0, 0, 0, 0], fn.__name__
        assert rows[4] < 0 < rows[5], fn.__name__


def test_reinforce_pp_returns_by_hand():
    """G_t = sum_{s >= t} gamma^(s - t) r_s over the valid tokens of (-0.25, -0.5, 1) and (2, junk, junk).
    gamma 1:   (0.25, 0.5, 1) and (2, 0, 0).
    gamma 0.5: G_2 = 1, G_1 = -0.5 + 0.5 * 1 = 0, G_0 = -0.25 + 0.5 * 0 = -0.25; and (2, 0, 0).
    """
    rewards = torch.tensor([[-0.25, -0.5, 1.0], [2.0, JUNK, -JUNK]], dtype=F64)
    mask = lengths_mask([3, 1], 3)
    advantages, returns, metrics = reinforce_pp_advantages(rewards, mask, group_size=1)
    assert returns is None
    assert advantages.tolist() == [[0.25, 0.5, 1.0], [2.0, 0.0, 0.0]]
    assert metrics["advantages/mean"].item() == pytest.approx(3.75 / 4, rel=1e-15)
    advantages, _, _ = reinforce_pp_advantages(rewards, mask, group_size=2, gamma=0.5)
    assert advantages.tolist() == [[-0.25, 0.0, 1.0], [2.0, 0.0, 0.0]]


def test_advantage_metrics_by_hand():
    """dr_grpo on one group (1, 0), one token each: advantages (0.5, -0.5), mean 0, unbiased std sqrt(1/2)."""
    rewards, mask = score_rewards([1, 0], [1, 1], 2)
    _, _, metrics = dr_grpo_advantages(rewards, mask, group_size=2)
    assert metrics["advantages/mean"].item() == 0.0
    assert metrics["advantages/std"].item() == pytest.approx(math.sqrt(0.5), rel=1e-15)
    assert metrics["advantages/zero_std_groups"].item() == 0.0


def test_gae_estimator_is_gae():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 5, generator=gen, dtype=F64), torch.randn(4, 5, generator=gen, dtype=F64)
    mask = lengths_mask([5, 2, 0, 4], 5)
    advantages, returns, _ = gae_advantages(rewards, mask, group_size=2, values=values, gamma=0.9, lam=0.8)
    want_adv, want_ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.equal(advantages, want_adv) and torch.equal(returns, want_ret)
    with pytest.raises(ValueError, match="values"):
        gae_advantages(rewards, mask, group_size=1)


def test_group_size_must_divide_the_batch():
    rewards, mask = score_rewards([1, 0, 1], [1, 1, 1], 1)
    for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages, reinforce_pp_advantages):
        with pytest.raises(ValueError, match="not a whole number of groups of 2"):
            fn(rewards, mask, group_size=2)
        with pytest.raises(ValueError, match="positive integer"):
            fn(rewards, mask, group_size=0)
    with pytest.raises(ValueError, match="at least 2 responses"):
        rloo_advantages(rewards, mask, group_size=1)


# --- aggregation ------------------------------------------------------------------------------------------


def test_aggregation_modes_by_hand():
    """Per-token losses (1, 2, 3) and (4, junk, junk), lengths 3 and 1, plus an all-False row that counts nothing.
    token-mean:          (1 + 2 + 3 + 4) / 4 = 2.5
    seq-mean-token-mean: (6/3 + 4/1) / 2 = 3
    seq-mean-token-sum:  (6/4 + 4/4) / 2 = 1.25 with L = 4
    """
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, JUNK, -JUNK]], dtype=F64)
    mask = lengths_mask([3, 1], 3)
    want = {"token-mean": 2.5, "seq-mean-token-mean": 3.0, "seq-mean-token-sum": 1.25}
    with_skipped = torch.cat([per_token, torch.full((1, 3), 7.0, dtype=F64)]), torch.cat([mask, mask[:1] & False])
    for mode, value in want.items():
        assert aggregate(per_token, mask, mode, max_length=4).item() == value
        assert aggregate(*with_skipped, mode, max_length=4).item() == value
    assert [aggregation_unit(m) for m in want] == ["tokens", "sequences", "sequences"]
    assert [aggregation_count(with_skipped[1], m).item() for m in want] == [4, 2, 2]
    with pytest.raises(ValueError, match="max_length"):
        aggregate(per_token, mask, "seq-mean-token-sum")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate(per_token, mask, "sum")
    assert aggregate(per_token, mask & False, "seq-mean-token-mean").item() == 0.0


# --- the clipped policy loss ------------------------------------------------------------------------------


def logs(*ratios):
    return torch.tensor([[math.log(r) for r in ratios]], dtype=F64)


def test_clip_higher_by_hand():
    """eps_low 0.2, eps_high 0.28 (DAPO), token-mean over four tokens:
    A =  1, ratio 1.25: inside [0.8, 1.28], -1.25
    A =  1, ratio 1.5:  clipped high, -1.28
    A = -1, ratio 0.5:  max(0.5, 0.8) = 0.8, clipped low
    A = -1, ratio 1.25: max(1.25, 1.25) = 1.25
    loss (-1.25 - 1.28 + 0.8 + 1.25) / 4 = -0.12; clipfrac_low 1/4, clipfrac_high 1/4.
    Symmetric eps 0.2 (PPO): -1.2 - 1.2 + 0.8 + 1.25, / 4 = -0.0875, two tokens clipped high.
    """
    logprobs, old = logs(1.25, 1.5, 0.5, 1.25), torch.zeros(1, 4, dtype=F64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = clipped_policy_loss(logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-0.12, rel=1e-12)
    assert (metrics["policy/clipfrac_low"].item(), metrics["policy/clipfrac_high"].item()) == (0.25, 0.25)
    assert metrics["policy/clipfrac"].item() == 0.5
    loss, metrics = clipped_policy_loss(logprobs, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-0.0875, rel=1e-12)
    assert (metrics["policy/clipfrac_low"].item(), metrics["policy/clipfrac_high"].item()) == (0.25, 0.5)
    assert loss.item() == pytest.approx(ppo_policy_loss(logprobs, old, advantages, mask, clip_coef=0.2)[0].item(),
                                        rel=1e-15)


def test_dual_clip_by_hand():
    """c = 3, eps 0.2, token-mean:
    A = -1, ratio 5:   max(5, 1.2) = 5, capped at -c A = 3 (its gradient is 0)
    A = -2, ratio 2:   max(4, 2.4) = 4 < 6, not capped
    A =  1, ratio 5:   -1.2, positive advantages are never capped
    A = -1, ratio 0.5: 0.8 (clipped low)
    loss (3 + 4 - 1.2 + 0.8) / 4 = 1.65, dual_clipfrac 1/4; without the dual clip (5 + 4 - 1.2 + 0.8) / 4 = 2.15.
    """
    logprobs = logs(5.0, 2.0, 5.0, 0.5).requires_grad_()
    old, mask = torch.zeros(1, 4, dtype=F64), torch.ones(1, 4, dtype=torch.bool)
    advantages = torch.tensor([[-1.0, -2.0, 1.0, -1.0]], dtype=F64)
    loss, metrics = clipped_policy_loss(logprobs, old, advantages, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx(1.65, rel=1e-12)
    assert metrics["policy/dual_clipfrac"].item() == 0.25
    loss.backward()
    # d/dlogp of -A ratio is -A ratio / 4: only the unclipped, uncapped token 2 has a gradient, 2 * 2 / 4
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=F64), rtol=1e-12, atol=0)
    loss, metrics = clipped_policy_loss(logprobs, old, advantages, mask)
    assert loss.item() == pytest.approx(2.15, rel=1e-12) and "policy/dual_clipfrac" not in metrics
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        clipped_policy_loss(logprobs, old, advantages, mask, dual_clip=1.0)


def gspo_reference(logprobs, old, advantages, mask, clip_low, clip_high):
    """GSPO as written (Zheng et al. 2025): s_i = exp(mean_t (logp - old_logp)), one advantage per row,
    loss -mean_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) over the rows with a valid token."""
    lengths = mask.sum(-1)
    s = torch.exp(torch.where(mask, logprobs - old, 0).sum(-1) / lengths.clamp_min(1))
    a = advantages[:, 0]
    per_row = torch.maximum(-a * s, -a * torch.clamp(s, 1 - clip_low, 1 + clip_high))
    return per_row[lengths > 0].mean()


def test_gspo_sequence_ratio_by_hand():
    """Row 0: log-ratios (0.1, 0.3), log s_0 = 0.2, A = 1; row 1: (-0.4, 0, 0.1), log s_1 = -0.1, A = -0.5.
    Clip wide (0.5): loss -(e^0.2 - 0.5 e^-0.1) / 2. Gradient on each token of row i: -A_i s_i / |o_i| / 2,
    so -e^0.2 / 4 on row 0 and 0.5 e^-0.1 / 6 on row 1. policy/ratio: (2 e^0.2 + 3 e^-0.1) / 5.
    With GSPO's clip (3e-4, 4e-4) both rows are clipped (s_0 > 1.0004 with A > 0, s_1 < 0.9997 with A < 0):
    loss -(1.0004 - 0.5 * 0.9997) / 2 and no gradient.
    """
    old = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -2.0]], dtype=F64)
    logprobs = (old + torch.tensor([[0.1, 0.3, JUNK], [-0.4, 0.0, 0.1]], dtype=F64)).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, -0.5]], dtype=F64)
    mask = lengths_mask([2, 3], 3)
    kw = dict(ratio_level="sequence", aggregation="seq-mean-token-mean")
    loss, metrics = clipped_policy_loss(logprobs, old, advantages, mask, clip_low=0.5, clip_high=0.5, **kw)
    assert loss.item() == pytest.approx(-(math.exp(0.2) - 0.5 * math.exp(-0.1)) / 2, rel=1e-12)
    assert metrics["policy/ratio"].item() == pytest.approx((2 * math.exp(0.2) + 3 * math.exp(-0.1)) / 5, rel=1e-12)
    loss.backward()
    g0, g1 = -math.exp(0.2) / 4, 0.5 * math.exp(-0.1) / 6
    torch.testing.assert_close(logprobs.grad, torch.tensor([[g0, g0, 0], [g1, g1, g1]], dtype=F64), rtol=1e-12, atol=0)
    logprobs.grad = None
    loss, metrics = clipped_policy_loss(logprobs, old, advantages, mask, clip_low=3e-4, clip_high=4e-4, **kw)
    assert loss.item() == pytest.approx(-(1.0004 - 0.5 * 0.9997) / 2, rel=1e-12)
    assert (metrics["policy/clipfrac_high"].item(), metrics["policy/clipfrac_low"].item()) == (0.4, 0.6)
    loss.backward()
    assert torch.all(logprobs.grad == 0)


def test_gspo_token_gradient_with_advantages_along_the_row():
    """GSPO-token (Zheng et al. 2025): per token sg[s] exp(logp_t - sg[logp_t]) with A_t = (1, 3), log-ratios
    (0.1, 0.3), log s = 0.2, clip wide. Value -(1 + 3) / 2 e^0.2 = -2 e^0.2; gradient -A_t s / 2 per token,
    (-e^0.2 / 2, -3 e^0.2 / 2), where the derivative of s itself would give -e^0.2 on both tokens."""
    old = torch.tensor([[-1.0, -2.0]], dtype=F64)
    logprobs = (old + torch.tensor([[0.1, 0.3]], dtype=F64)).requires_grad_()
    loss, _ = clipped_policy_loss(logprobs, old, torch.tensor([[1.0, 3.0]], dtype=F64), torch.ones(1, 2) > 0,
                                  clip_low=0.5, clip_high=0.5, ratio_level="sequence", aggregation="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-2 * math.exp(0.2), rel=1e-12)
    loss.backward()
    s = math.exp(0.2)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-s / 2, -3 * s / 2]], dtype=F64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("clip", [(0.2, 0.2), (3e-4, 4e-4)])
def test_gspo_matches_the_sequence_level_formula_and_its_autograd(clip):
    """Against GSPO's sequence-level objective written directly, value and gradient, random rows (one skipped)."""
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(6, 5, generator=gen, dtype=F64) * 2
    logprobs = (old + torch.randn(6, 5, generator=gen, dtype=F64) * 0.2).requires_grad_()
    advantages = torch.randn(6, 1, generator=gen, dtype=F64).expand(6, 5)
    mask = lengths_mask([5, 3, 0, 1, 4, 2], 5)
    loss, _ = clipped_policy_loss(logprobs, old, advantages, mask, clip_low=clip[0], clip_high=clip[1],
                                  ratio_level="sequence", aggregation="seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss, logprobs)
    want = gspo_reference(logprobs, old, advantages, mask, *clip)
    (want_grad,) = torch.autograd.grad(want, logprobs)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert grad.abs().sum() > 0 if clip[0] == 0.2 else True


def test_kl_term_by_hand():
    """GRPO's defaults (kl_coef 0.04, k3, seq-mean-token-mean) at ratio 1 and A = 0, so only the KL term counts.
    With d = ref - logp, k3 = e^d - d - 1: row 0 d = (ln 2, 0): 1 - ln 2 and 0; row 1 d = -ln 2: ln 2 - 1/2.
    loss 0.04 * ((1 - ln 2) / 2 + (ln 2 - 1/2)) / 2; policy/kl_ref, a token mean: 1/2 / 3 = 1/6.
    """
    logprobs = torch.tensor([[-1.0, -1.0], [-2.0, JUNK]], dtype=F64)
    ref = logprobs + torch.tensor([[math.log(2), 0.0], [-math.log(2), -JUNK]], dtype=F64)
    mask = lengths_mask([2, 1], 2)
    _, fn = bind_objective("grpo")
    loss, metrics = fn(logprobs, logprobs, torch.zeros(2, 2, dtype=F64), mask, ref_logprobs=ref)
    ln2 = math.log(2)
    assert loss.item() == pytest.approx(0.04 * ((1 - ln2) / 2 + (ln2 - 0.5)) / 2, rel=1e-12)
    assert metrics["policy/kl_ref"].item() == pytest.approx(1 / 6, rel=1e-12)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        fn(logprobs, logprobs, torch.zeros(2, 2, dtype=F64), mask)
    loss, metrics = clipped_policy_loss(logprobs, logprobs, torch.zeros(2, 2, dtype=F64), mask, ref_logprobs=ref)
    assert loss.item() == 0.0 and metrics["policy/kl_ref"].item() == pytest.approx(1 / 6, rel=1e-12)


def test_own_defaults_are_ppo_clipped_loss():
    """clip 0.2 both sides, token ratio, token-mean, no KL: ppo_policy_loss with clip_coef 0.2, metric for metric."""
    gen = torch.Generator().manual_seed(4)
    old = -torch.rand(4, 6, generator=gen, dtype=F64) * 2
    logprobs = old + torch.randn(4, 6, generator=gen, dtype=F64) * 0.3
    advantages = torch.randn(4, 6, generator=gen, dtype=F64)
    mask = lengths_mask([6, 4, 1, 2], 6)
    loss, metrics = clipped_policy_loss(logprobs, old, advantages, mask)
    want, want_metrics = ppo_policy_loss(logprobs, old, advantages, mask, clip_coef=0.2)
    assert metrics["policy/clipfrac"] > 0
    torch.testing.assert_close(loss, want, rtol=1e-15, atol=0)
    for key in ("policy/clipfrac", "policy/approx_kl", "policy/ratio"):
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=1e-15, atol=0)


MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", MODES)
def test_policy_loss_gradcheck(aggregation, ratio_level):
    """float64 gradcheck in logprobs, advantages and ref_logprobs, with the KL term, dual clip and a skipped row.
    Log-ratios of +-0.05 and +-0.5 (sequence means 0.017, 0, 0.5) keep clear of the kinks at ln 0.8, ln 1.2, ln 3.
    The sequence ratio gets one advantage per row, the case its gradient is the derivative of its value (with
    per-token advantages the sg[s_i] form gives GSPO-token's gradient instead)."""
    gen = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    logprobs = (-torch.rand(4, 4, generator=gen, dtype=F64)).requires_grad_()
    offsets = torch.tensor([[0.05, 0.5, -0.5, 0.0], [0.05, -0.05, 0, 0], [0, 0, 0, 0], [0.5, 0.5, 0, 0]], dtype=F64)
    old = logprobs.detach() - offsets
    advantages = torch.randn(4, 4 if ratio_level == "token" else 1, generator=gen, dtype=F64).requires_grad_()
    ref = (logprobs.detach() + 0.3 * torch.randn(4, 4, generator=gen, dtype=F64)).requires_grad_()

    def fn(lp, a, r):
        return clipped_policy_loss(lp, old, a.expand(4, 4), mask, dual_clip=3.0, ratio_level=ratio_level,
                                   aggregation=aggregation, max_length=5, ref_logprobs=r, kl_coef=0.1)[0]

    assert torch.autograd.gradcheck(fn, (logprobs, advantages, ref))


@pytest.mark.parametrize("splits", [[3, 5], [1, 1, 6]])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", MODES)
def test_micro_batching_by_aggregation_unit_is_exact(aggregation, ratio_level, splits):
    """8 rows of mixed lengths (two skipped) split into micro-batches, each trimmed to its longest row as the
    engine trims them; each micro-batch's loss weighted by its share of the batch's units
    (``aggregation_count``: tokens or sequences) sums to the full batch's loss and gradient. Row 1 is skipped,
    so the [1, 1, 6] split has a micro-batch of weight 0."""
    gen = torch.Generator().manual_seed(5)
    lengths = [5, 0, 3, 1, 5, 2, 0, 4]
    mask = lengths_mask(lengths, 5)
    old = -torch.rand(8, 5, generator=gen, dtype=F64) * 2
    logprobs = (old + torch.randn(8, 5, generator=gen, dtype=F64) * 0.4).requires_grad_()
    advantages = torch.randn(8, 1, generator=gen, dtype=F64).expand(8, 5) + 0.1 * torch.randn(8, 5, generator=gen,
                                                                                                dtype=F64)
    ref = old + 0.3 * torch.randn(8, 5, generator=gen, dtype=F64)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, ratio_level=ratio_level, aggregation=aggregation,
              max_length=6, kl_coef=0.1)

    full, _ = clipped_policy_loss(logprobs, old, advantages, mask, ref_logprobs=ref, **kw)
    (full_grad,) = torch.autograd.grad(full, logprobs)
    total = aggregation_count(mask, aggregation)
    accumulated, grad = torch.zeros((), dtype=F64), torch.zeros_like(logprobs)
    for rows in torch.split(torch.arange(8), splits):
        width = max(1, max(lengths[i] for i in rows))
        cols = slice(0, width)
        part_mask = mask[rows, cols]
        loss, _ = clipped_policy_loss(logprobs[rows, cols], old[rows, cols], advantages[rows, cols], part_mask,
                                      ref_logprobs=ref[rows, cols], **kw)
        weighted = loss * aggregation_count(part_mask, aggregation) / total
        (part_grad,) = torch.autograd.grad(weighted, logprobs)
        accumulated, grad = accumulated + weighted.detach(), grad + part_grad
    torch.testing.assert_close(accumulated, full.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-15)
    assert full_grad.abs().sum() > 0


def test_micro_batching_by_tokens_is_wrong_for_sequence_means():
    """The weighting matters: seq-mean-token-mean split [3, 5] and weighted by tokens misses the full loss."""
    gen = torch.Generator().manual_seed(6)
    mask = lengths_mask([5, 1, 3, 1, 5, 2, 1, 4], 5)
    old = -torch.rand(8, 5, generator=gen, dtype=F64)
    logprobs = old + 0.1 * torch.randn(8, 5, generator=gen, dtype=F64)
    advantages = torch.randn(8, 5, generator=gen, dtype=F64)
    kw = dict(aggregation="seq-mean-token-mean")
    full, _ = clipped_policy_loss(logprobs, old, advantages, mask, **kw)
    by_tokens = sum(clipped_policy_loss(logprobs[r], old[r], advantages[r], mask[r], **kw)[0] * mask[r].sum()
                    / mask.sum() for r in torch.split(torch.arange(8), [3, 5]))
    assert abs(by_tokens.item() - full.item()) > 1e-3


def test_unknown_choices_are_errors():
    x, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        clipped_policy_loss(x, x, x, mask, ratio_level="seq")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        clipped_policy_loss(x, x, x, mask, aggregation="mean")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        clipped_policy_loss(x, x, x, mask, kl_estimator="k4")
    with pytest.raises(ValueError, match="max_length"):
        bind_objective("dr_grpo")[1](x, x, x, mask)


# --- soft overlong punishment -----------------------------------------------------------------------------


def test_soft_overlong_penalty_by_hand():
    """L_max 20, L_cache 4: 0 up to 16 tokens, (16 - L) / 4 from 17 to 20 (-0.25, -0.75, -1), -1 beyond."""
    lengths = torch.tensor([10, 16, 17, 19, 20, 21, 100])
    penalty = soft_overlong_penalty(lengths, max_length=20, buffer=4)
    assert penalty.dtype == torch.float32
    assert penalty.tolist() == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0, -1.0]
    half = soft_overlong_penalty(lengths.to(F64), max_length=20, buffer=4, factor=0.5)
    assert half.dtype == F64 and half.tolist() == [0.0, 0.0, -0.125, -0.375, -0.5, -0.5, -0.5]
    for buffer in (0, 21):
        with pytest.raises(ValueError, match="buffer"):
            soft_overlong_penalty(lengths, max_length=20, buffer=buffer)


# --- registries -------------------------------------------------------------------------------------------

ESTIMATORS = {  # name: (needs_critic, whiten)
    "gae": (True, True),
    "grpo": (False, False),
    "dr_grpo": (False, False),
    "rloo": (False, False),
    "reinforce_pp": (False, True),
}
OBJECTIVE_ADVANTAGE = {
    "ppo": "gae", "grpo": "grpo", "dr_grpo": "dr_grpo", "dapo": "grpo", "gspo": "grpo", "rloo": "rloo",
    "reinforce_pp": "reinforce_pp",
}


def test_advantage_registry():
    builtin = {e.name: e for e in list_advantages() if e.fn.__module__ == "losses.advantages"}
    assert {name: (e.needs_critic, e.whiten) for name, e in builtin.items()} == ESTIMATORS
    assert [e.name for e in list_advantages()] == sorted(e.name for e in list_advantages())
    assert get_advantage("grpo").fn is grpo_advantages and get_advantage("grpo").doc.startswith("Group-normalised")
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'gpro' \(did you mean 'grpo'\?\).*rloo"):
        get_advantage("gpro")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo", needs_critic=False, whiten=False)(rloo_advantages)
    with pytest.raises(AttributeError):
        get_advantage("grpo").whiten = True


def test_every_estimator_has_the_common_signature():
    for estimator in list_advantages():
        params = inspect.signature(estimator.fn).parameters.values()
        assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == ["rewards", "mask"]
        assert [p.name for p in params if p.kind is p.KEYWORD_ONLY] == ["group_size", "values", "gamma", "lam", "eps"]


def test_objectives_name_their_advantage_and_paper_defaults():
    for name, advantage in OBJECTIVE_ADVANTAGE.items():
        objective = get_objective(name)
        assert objective.family == "ppo" and objective.advantage == advantage, name
        assert get_advantage(objective.advantage).name == advantage
    assert get_objective("sft").advantage is None and get_objective("dpo").advantage is None
    assert get_objective("losses.policy:clipped_policy_loss").name == "grpo"
    defaults = {name: dict(get_objective(name).defaults) for name in OBJECTIVE_ADVANTAGE if name != "ppo"}
    assert defaults["grpo"] == {"clip_low": 0.2, "clip_high": 0.2, "aggregation": "seq-mean-token-mean",
                                "kl_coef": 0.04, "kl_estimator": "k3"}
    assert defaults["dr_grpo"] == {"clip_low": 0.2, "clip_high": 0.2, "aggregation": "seq-mean-token-sum",
                                   "kl_coef": 0.0}
    assert defaults["dapo"] == {"clip_low": 0.2, "clip_high": 0.28, "aggregation": "token-mean", "kl_coef": 0.0}
    assert defaults["gspo"] == {"ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4,
                                "aggregation": "seq-mean-token-mean", "kl_coef": 0.0}
    assert defaults["rloo"]["aggregation"] == "seq-mean-token-sum"
    assert defaults["reinforce_pp"] == {"clip_low": 0.2, "clip_high": 0.2, "aggregation": "token-mean", "kl_coef": 0.0}
    with pytest.raises(ValueError, match="only the ppo family"):
        losses.register("test_sft_with_advantage", family="sft", advantage="grpo")(losses.sft_loss)


def test_ranges_are_checked_when_binding():
    for kwargs, message in [
        ({"clip_high": 0.0}, "clip_high must be a number > 0"),
        ({"clip_low": 1.0}, "clip_low must be a number > 0 and < 1"),
        ({"dual_clip": 1.0}, "dual_clip must be a number > 1"),
        ({"kl_coef": -0.01}, "kl_coef must be a number >= 0"),
        ({"max_length": 0}, "max_length must be a number > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            bind_objective("dapo", kwargs)
    _, fn = bind_objective("dapo", {"dual_clip": None, "max_length": None, "clip_high": 0.3})
    assert fn.keywords["dual_clip"] is None and fn.keywords["clip_high"] == 0.3
    with pytest.raises(ValueError, match="did you mean 'clip_high'"):
        bind_objective("gspo", {"clip_hgh": 0.1})
