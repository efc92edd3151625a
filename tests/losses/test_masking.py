"""Masked reductions and whitening, against hand numbers and a plain-loop float64 oracle."""

import math

import pytest
import torch

from losses import masked_mean, masked_sum, masked_var, masked_whiten

F64 = torch.float64


def whiten_oracle(values, mask, *, shift_mean=True, unbiased=True):
    """Plain Python: mean and variance of the valid entries, then (v - mean) / sqrt(var + 1e-8)."""
    valid = [v for row, mrow in zip(values, mask) for v, m in zip(row, mrow) if m]
    mean = sum(valid) / len(valid)
    var = sum((v - mean) ** 2 for v in valid) / (len(valid) - 1 if unbiased else len(valid))
    out = []
    for row, mrow in zip(values, mask):
        out_row = []
        for v, m in zip(row, mrow):
            w = (v - mean) / math.sqrt(var + 1e-8)
            out_row.append((w if shift_mean else w + mean) if m else 0.0)
        out.append(out_row)
    return out


def test_masked_sum_and_mean_by_hand():
    """Valid entries 1, 2, 3 (and 10 masked out): sum 6, token mean 2, row means 1.5 and 3."""
    values = torch.tensor([[1.0, 2.0], [3.0, 10.0]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    assert masked_sum(values, mask).item() == 6.0
    assert masked_mean(values, mask).item() == 2.0
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([1.5, 3.0], dtype=F64))
    torch.testing.assert_close(masked_sum(values, mask, dim=0), torch.tensor([4.0, 2.0], dtype=F64))


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    values = torch.tensor([[5.0, -1000.0]])
    assert masked_mean(values, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0
    torch.testing.assert_close(
        masked_mean(values, torch.tensor([[True, False]]), dim=0), torch.tensor([5.0, 0.0])
    )


def test_masked_var_by_hand():
    """Valid 1, 2, 3: squared deviations 1, 0, 1 sum to 2; unbiased var 2/2 = 1, population 2/3."""
    values = torch.tensor([[1.0, 2.0, 3.0, 1e6]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    assert masked_var(values, mask).item() == 1.0
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3, rel=1e-15)


def test_whiten_by_hand():
    """Valid 1, 2, 3: mean 2, unbiased var 1, so whitened = (-1, 0, 1) / sqrt(1 + 1e-8); padding 0."""
    values = torch.tensor([[1.0, 2.0], [3.0, -1000.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    scale = 1 / math.sqrt(1 + 1e-8)
    expected = torch.tensor([[-scale, 0.0], [scale, 0.0]], dtype=F64)
    torch.testing.assert_close(masked_whiten(values, mask), expected, rtol=1e-12, atol=0)
    kept = torch.tensor([[2 - scale, 2.0], [2 + scale, 0.0]], dtype=F64)
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), kept, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_whiten_matches_plain_loop_oracle(shift_mean, unbiased):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=gen, dtype=F64) * 3 + 1
    lengths = [7, 3, 1, 5]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    got = masked_whiten(values, mask, shift_mean=shift_mean, unbiased=unbiased)
    want = whiten_oracle(values.tolist(), mask.tolist(), shift_mean=shift_mean, unbiased=unbiased)
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-10, atol=1e-12)
    valid = got[mask]
    if shift_mean:
        assert abs(valid.mean().item()) < 1e-12
    if unbiased and shift_mean:
        assert valid.var().item() == pytest.approx(1.0, rel=1e-7)


def test_whiten_gradcheck():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda v: masked_whiten(v, mask), (values,))
    assert torch.autograd.gradcheck(lambda v: masked_var(v, mask), (values,))


def test_float_and_int_masks_agree_with_bool():
    values = torch.tensor([[1.0, 4.0, 7.0]])
    bool_mask = torch.tensor([[True, False, True]])
    for mask in (bool_mask.long(), bool_mask.float(), bool_mask.to(torch.uint8)):
        assert torch.equal(masked_whiten(values, mask), masked_whiten(values, bool_mask))
        assert torch.equal(masked_mean(values, mask), masked_mean(values, bool_mask))
