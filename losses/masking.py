"""Masked reductions over the positions that count.

Every function here takes a mask of the same shape as the values, bool or 0/1, True meaning the
position counts. Masked positions may hold any finite junk: they are replaced by 0 with
``torch.where`` before any arithmetic, so neither the value nor the gradient can see them.
"""

from __future__ import annotations

import torch
from torch import Tensor

WHITEN_EPS = 1e-8


def as_bool_mask(mask: Tensor) -> Tensor:
    """Return ``mask`` as a bool tensor (a 0/1 integer or float mask becomes ``mask != 0``)."""
    return mask if mask.dtype == torch.bool else mask != 0


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (fp16/bf16/fp32 are computed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def upcast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast all inputs to their common compute dtype (see ``compute_dtype``)."""
    dtype = compute_dtype(*tensors)
    return tuple(t.to(dtype) for t in tensors)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is True, over ``dim`` (all positions when None).

    Args:
        values: any shape, e.g. (B, R).
        mask: same shape as ``values``.
        dim: dimension to reduce; None reduces everything to a scalar.

    Returns:
        The masked sum, computed in fp32 (float64 inputs stay float64).
    """
    (values,) = upcast(values)
    kept = torch.where(as_bool_mask(mask), values, 0)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is True (token-weighted when dim is None).

    Args:
        values: any shape, e.g. (B, R).
        mask: same shape as ``values``.
        dim: dimension to reduce; None gives one mean over every valid position.

    Returns:
        sum(values * mask) / sum(mask); an all-False mask gives 0, not NaN.
    """
    mask = as_bool_mask(mask)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp_min(1)


def masked_var(values: Tensor, mask: Tensor, *, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over all positions where ``mask`` is True.

    Args:
        values: any shape, e.g. (B, R).
        mask: same shape as ``values``.
        unbiased: divide by n - 1 (Bessel's correction) when True, by n when False.

    Returns:
        A scalar; 0 when fewer than two positions count (unbiased) or none (population).
    """
    mask = as_bool_mask(mask)
    (values,) = upcast(values)
    values = torch.where(mask, values, 0)
    centred = torch.where(mask, values - masked_mean(values, mask), 0)
    count = mask.sum()
    return centred.square().sum() / (count - 1 if unbiased else count).clamp_min(1)


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True, unbiased: bool = True,
                  mean: Tensor | None = None, var: Tensor | None = None) -> Tensor:
    """Normalise ``values`` to zero mean and unit variance over the valid positions of the whole batch.

    Convention: the variance is the unbiased one (n - 1), eps 1e-8 inside the square root, as TRL's
    ``masked_whiten``. lm-human-preferences' ``whiten`` (Ziegler et al. 2019) uses the population
    variance; pass ``unbiased=False`` to reproduce its numbers.

    Args:
        values: (B, R), e.g. advantages.
        mask: (B, R), True on the tokens that count.
        shift_mean: when False the mean is added back, so only the scale changes (used for rewards).
        unbiased: see the convention above; ignored when ``var`` is given.
        mean, var: scalar statistics to use instead of this batch's, e.g. those of a batch split over
            processes (each process holding a part), so that every part is whitened as the whole would be.

    Returns:
        (B, R) whitened values, 0 on masked positions.
    """
    mask = as_bool_mask(mask)
    (values,) = upcast(values)
    values = torch.where(mask, values, 0)
    mean = masked_mean(values, mask) if mean is None else torch.as_tensor(mean).to(values)
    var = masked_var(values, mask, unbiased=unbiased) if var is None else torch.as_tensor(var).to(values)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0)
