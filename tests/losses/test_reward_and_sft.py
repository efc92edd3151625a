"""The Bradley-Terry reward-model loss and the SFT token NLL on hand-derived numbers."""

import math

import pytest
import torch

from losses import get_objective, pairwise_reward_loss, reward_weighted_sft_loss, sft_loss

F64 = torch.float64


def softplus(x):
    return math.log1p(math.exp(x))


def test_reward_loss_by_hand():
    """r_c = (1, 0), r_r = (0, 2): differences (1, -2); loss = (softplus(-1) + softplus(2)) / 2.

    Accuracy 1/2 (strict), margins mean (1 - 2) / 2 = -0.5, chosen mean 0.5, rejected mean 1.
    """
    loss, metrics = pairwise_reward_loss(
        torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64)
    )
    assert loss.item() == pytest.approx((softplus(-1) + softplus(2)) / 2, rel=1e-14)
    assert metrics["rewards/accuracies"].item() == 0.5
    assert metrics["rewards/margins"].item() == -0.5
    assert metrics["rewards/chosen"].item() == 0.5
    assert metrics["rewards/rejected"].item() == 1.0


def test_reward_margin_and_centring_by_hand():
    """Margins (1, 0) turn the differences into (0, -2): loss (ln 2 + softplus(2)) / 2.
    center_coef 0.01 adds 0.01 * mean((1 + 0)^2, (0 + 2)^2) = 0.01 * 2.5 = 0.025.
    """
    chosen, rejected = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 2.0], dtype=F64)
    margin = torch.tensor([1.0, 0.0], dtype=F64)
    loss, _ = pairwise_reward_loss(chosen, rejected, margin=margin)
    assert loss.item() == pytest.approx((math.log(2) + softplus(2)) / 2, rel=1e-14)
    centred, _ = pairwise_reward_loss(chosen, rejected, margin=margin, center_coef=0.01)
    assert centred.item() == pytest.approx(loss.item() + 0.025, rel=1e-14)


def test_reward_ties_are_not_accurate_and_cost_log_2():
    loss, metrics = pairwise_reward_loss(torch.zeros(3), torch.zeros(3))
    assert metrics["rewards/accuracies"].item() == 0.0
    assert loss.item() == pytest.approx(math.log(2), rel=1e-7)


def test_reward_gradcheck_and_dtypes():
    gen = torch.Generator().manual_seed(0)
    chosen, rejected, margin = (torch.randn(5, generator=gen, dtype=F64) for _ in range(3))
    chosen.requires_grad_()
    rejected.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c, r: pairwise_reward_loss(c, r, margin=margin, center_coef=0.1)[0], (chosen, rejected)
    )
    loss, metrics = pairwise_reward_loss(chosen.to(torch.bfloat16), rejected.to(torch.bfloat16))
    assert loss.dtype == torch.float32 and metrics["rewards/chosen"].dtype == torch.float32


def test_sft_loss_by_hand():
    """Counted log-probs -(1, 2, 3) ln 2: token-mean NLL 2 ln 2 (a mean of row means would be 2.25 ln 2)."""
    ln2 = math.log(2)
    logprobs = torch.tensor([[-ln2, -2 * ln2, -1000.0], [-3 * ln2, 1000.0, 1000.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = sft_loss(logprobs, mask)
    assert loss.item() == pytest.approx(2 * ln2, rel=1e-15)
    assert torch.equal(metrics["loss/nll"], loss.detach())


def test_sft_gradcheck():
    gen = torch.Generator().manual_seed(1)
    logprobs = -torch.rand(3, 4, generator=gen, dtype=F64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: sft_loss(x, mask)[0], (logprobs,))


def test_reward_weighted_sft_loss_by_hand():
    """Rows of log-probs (-1, -2) and (-0.5), weights 0.5 and 2: -(0.5 (-1 - 2) + 2 (-0.5)) / 3 tokens = 2.5 / 3,
    beside the unweighted NLL 3.5 / 3; each counted token's gradient is -w / 3: -1/6 in row 0, -2/3 in row 1."""
    logprobs = torch.tensor([[-1.0, -2.0, -1000.0], [-0.5, 1000.0, 1000.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, metrics = reward_weighted_sft_loss(logprobs, mask, torch.tensor([0.5, 2.0], dtype=F64))
    assert loss.item() == pytest.approx(2.5 / 3, rel=1e-15)
    assert metrics["loss/nll"].item() == pytest.approx(3.5 / 3, rel=1e-15)
    assert torch.equal(metrics["loss/weighted_nll"], loss.detach())
    assert metrics["weights/mean"].item() == 1.25
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 6, -1 / 6, 0.0], [-2 / 3, 0.0, 0.0]], dtype=F64),
                               rtol=1e-15, atol=0)


def test_reward_weighted_sft_with_weights_one_is_sft_and_scales_with_the_weights():
    gen = torch.Generator().manual_seed(2)
    logprobs = -torch.rand(3, 5, generator=gen, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    ones, _ = reward_weighted_sft_loss(logprobs, mask, torch.ones(3, dtype=F64))
    torch.testing.assert_close(ones, sft_loss(logprobs, mask)[0], rtol=1e-15, atol=0)
    zero_last, _ = reward_weighted_sft_loss(logprobs, mask, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    # a weight of 0 drops the row from the numerator; the divisor still counts its token: 3 + 4 + 1 = 8
    torch.testing.assert_close(zero_last, -(logprobs[:2] * mask[:2]).sum() / 8, rtol=1e-15, atol=0)
    objective = get_objective("reward_weighted_sft")
    assert (objective.family, objective.row_weights, objective.needs_reference) == ("sft", True, False)
    assert get_objective("sft").row_weights is False


def test_reward_weighted_sft_gradcheck():
    gen = torch.Generator().manual_seed(3)
    logprobs = -torch.rand(3, 4, generator=gen, dtype=F64).requires_grad_()
    weights = torch.rand(3, generator=gen, dtype=F64).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x, w: reward_weighted_sft_loss(x, mask, w)[0], (logprobs, weights))


@pytest.mark.parametrize("splits", [[1, 1, 1, 1], [2, 2], [3, 1]])
def test_reward_weighted_sft_micro_batches_by_their_token_share(splits):
    """sum_k loss_k * n_k / n over micro-batches of rows (with their weights) equals the full batch's loss."""
    gen = torch.Generator().manual_seed(4)
    logprobs = -torch.rand(4, 5, generator=gen, dtype=F64)
    weights = torch.tensor([0.5, 2.0, 1.0, 0.0], dtype=F64)
    mask = torch.arange(5)[None] < torch.tensor([5, 2, 1, 4])[:, None]
    full, _ = reward_weighted_sft_loss(logprobs, mask, weights)
    parts = [reward_weighted_sft_loss(logprobs[rows], mask[rows], weights[rows])[0] * mask[rows].sum() / mask.sum()
             for rows in torch.split(torch.arange(4), splits)]
    torch.testing.assert_close(sum(parts), full, rtol=1e-14, atol=0)
