"""ORPO: hand numbers, the log-odds near log-prob 0 and far below, a plain-loop oracle, gradients."""

import math

import pytest
import torch

from losses import log1m_exp, orpo_loss

F64 = torch.float64
LN2 = math.log(2)


def orpo_oracle(chosen, chosen_mask, rejected, rejected_mask, lam, sft_mask=None):
    """Plain Python: mean log-prob per row, log odds = lp - log(1 - e^lp) with 1 - e^lp = -expm1(lp)."""
    sft_mask = chosen_mask if sft_mask is None else sft_mask
    nll_sum, nll_count = 0.0, 0
    for row, mrow in zip(chosen, sft_mask):
        for v, m in zip(row, mrow):
            if m:
                nll_sum -= v
                nll_count += 1
    ratio_terms = []
    for c_row, c_mask, r_row, r_mask in zip(chosen, chosen_mask, rejected, rejected_mask):
        c_vals = [v for v, m in zip(c_row, c_mask) if m]
        r_vals = [v for v, m in zip(r_row, r_mask) if m]
        c_lp, r_lp = sum(c_vals) / len(c_vals), sum(r_vals) / len(r_vals)
        log_odds = (c_lp - math.log(-math.expm1(c_lp))) - (r_lp - math.log(-math.expm1(r_lp)))
        ratio_terms.append(math.log1p(math.exp(-log_odds)))
    return nll_sum / nll_count + lam * sum(ratio_terms) / len(ratio_terms)


def test_orpo_by_hand():
    """Chosen tokens (-ln 2, -ln 2): mean -ln 2, P = 1/2, odds 1, log odds 0.
    Rejected tokens (-ln 2, -3 ln 2): mean -2 ln 2, P = 1/4, odds 1/3, log odds -ln 3.
    Log odds ratio ln 3, L_OR = -log sigmoid(ln 3) = -log(3/4) = ln(4/3); NLL = ln 2.
    lam = 0.5: loss = ln 2 + 0.5 ln(4/3). Padding holds junk (+-1000) and is masked out.
    """
    chosen = torch.tensor([[-LN2, -LN2, 1000.0]], dtype=F64)
    rejected = torch.tensor([[-LN2, -3 * LN2, -1000.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    loss, metrics = orpo_loss(chosen, mask, rejected, mask, lam=0.5)
    assert loss.item() == pytest.approx(LN2 + 0.5 * math.log(4 / 3), rel=1e-14)
    assert metrics["loss/nll"].item() == pytest.approx(LN2, rel=1e-15)
    assert metrics["logps/log_odds_chosen"].item() == pytest.approx(math.log(3), rel=1e-14)
    assert metrics["logps/log_odds_ratio"].item() == pytest.approx(math.log(3 / 4), rel=1e-14)
    assert metrics["rewards/chosen"].item() == pytest.approx(-0.5 * LN2, rel=1e-15)
    assert metrics["rewards/rejected"].item() == pytest.approx(-LN2, rel=1e-15)
    assert metrics["rewards/accuracies"].item() == 1.0
    assert metrics["logps/chosen"].item() == pytest.approx(-LN2, rel=1e-15)
    assert all("/" in key for key in metrics), sorted(metrics)  # namespaced, as every objective's keys
    assert metrics["logps/rejected"].item() == pytest.approx(-2 * LN2, rel=1e-15)


def test_sft_mask_selects_prompt_and_response_nll():
    """The prompt token (-ln 4) joins the NLL: mean(ln 4, ln 2, ln 2) = 4 ln 2 / 3; L_OR is unchanged."""
    chosen = torch.tensor([[-2 * LN2, -LN2, -LN2]], dtype=F64)
    rejected = torch.tensor([[-5.0, -LN2, -3 * LN2]], dtype=F64)
    response = torch.tensor([[False, True, True]])
    full = torch.tensor([[True, True, True]])
    loss, metrics = orpo_loss(chosen, response, rejected, response, lam=0.5, sft_mask=full)
    assert metrics["loss/nll"].item() == pytest.approx(4 * LN2 / 3, rel=1e-15)
    assert loss.item() == pytest.approx(4 * LN2 / 3 + 0.5 * math.log(4 / 3), rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_odds_at_the_extremes(dtype):
    """Mean log-probs -1e-12 (chosen) and -50 (rejected).

    log(1 - e^-1e-12) = log(1e-12 - 5e-25) = ln(1e-12) - 5e-13, so log odds(chosen) = 27.631021115928...;
    log(1 - e^-50) = -1.9e-22, so log odds(rejected) = -50. The ratio is 77.63 and
    L_OR = softplus(-77.63) = e^-77.63 ~ 1.9e-34. A naive log1p(-exp(lp)) gives -inf in fp32 at -1e-12
    and is off by ~8e-7 relative in float64.
    """
    chosen = torch.full((2, 3), -1e-12, dtype=dtype, requires_grad=True)
    rejected = torch.full((2, 3), -50.0, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, metrics = orpo_loss(chosen, mask, rejected, mask, lam=1.0)
    log_odds_chosen = -1e-12 - (math.log(1e-12) - 5e-13)
    want_ratio = log_odds_chosen + 50.0
    rtol = 1e-10 if dtype == F64 else 1e-6
    assert metrics["logps/log_odds_chosen"].item() == pytest.approx(want_ratio, rel=rtol)
    assert loss.item() == pytest.approx(1e-12 + math.exp(-want_ratio), rel=rtol)
    loss.backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_log1m_exp_is_accurate_on_both_sides_of_the_switch():
    x = torch.tensor([-1e-300, -1e-12, -1e-3, -0.5, -math.log(2), -0.7, -5.0, -50.0, -800.0], dtype=F64)
    want = [math.log(-math.expm1(v)) if v > -math.log(2) else math.log1p(-math.exp(v)) for v in x.tolist()]
    torch.testing.assert_close(log1m_exp(x), torch.tensor(want, dtype=F64), rtol=1e-14, atol=0)
    x.requires_grad_()
    log1m_exp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.autograd.gradcheck(
        log1m_exp, (torch.tensor([-1e-3, -0.3, -0.9, -4.0], dtype=F64, requires_grad=True),)
    )


def _random_batch(seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    chosen = -torch.rand(4, 6, generator=gen, dtype=dtype) * 3 - 0.01
    rejected = -torch.rand(4, 6, generator=gen, dtype=dtype) * 3 - 0.01
    chosen_mask = torch.arange(6)[None] < torch.tensor([6, 2, 4, 1])[:, None]
    rejected_mask = torch.arange(6)[None] < torch.tensor([3, 6, 1, 5])[:, None]
    return chosen, chosen_mask, rejected, rejected_mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_orpo_matches_plain_loop_oracle(seed):
    chosen, chosen_mask, rejected, rejected_mask = _random_batch(seed)
    loss, _ = orpo_loss(chosen, chosen_mask, rejected, rejected_mask, lam=0.7)
    want = orpo_oracle(chosen.tolist(), chosen_mask.tolist(), rejected.tolist(), rejected_mask.tolist(), 0.7)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    sft_mask = torch.ones_like(chosen_mask)
    loss, _ = orpo_loss(chosen, chosen_mask, rejected, rejected_mask, lam=0.7, sft_mask=sft_mask)
    want = orpo_oracle(
        chosen.tolist(),
        chosen_mask.tolist(),
        rejected.tolist(),
        rejected_mask.tolist(),
        0.7,
        sft_mask.tolist(),
    )
    assert loss.item() == pytest.approx(want, rel=1e-10)


def test_orpo_gradcheck():
    chosen, chosen_mask, rejected, rejected_mask = _random_batch(3)
    chosen.requires_grad_()
    rejected.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda c, r: orpo_loss(c, chosen_mask, r, rejected_mask, lam=0.4)[0], (chosen, rejected)
    )


def test_bf16_is_computed_in_fp32():
    chosen, chosen_mask, rejected, rejected_mask = _random_batch(4)
    c16, r16 = chosen.to(torch.bfloat16), rejected.to(torch.bfloat16)
    loss, metrics = orpo_loss(c16, chosen_mask, r16, rejected_mask, lam=0.5)
    assert loss.dtype == torch.float32 and metrics["loss/nll"].dtype == torch.float32
    assert torch.equal(loss, orpo_loss(c16.float(), chosen_mask, r16.float(), rejected_mask, lam=0.5)[0])
