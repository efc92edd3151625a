"""Reward shaping by response length: DAPO's soft overlong punishment."""

from __future__ import annotations

import torch
from torch import Tensor

from .masking import upcast


def soft_overlong_penalty(lengths: Tensor, *, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """Length penalty that ramps from 0 to -factor over the last ``buffer`` tokens (Yu et al. 2025, DAPO, Eq. 13).

    With L_max = ``max_length`` and L_cache = ``buffer``:

        R_length(y) = 0                                  if |y| <= L_max - L_cache
                    = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                    = -1                                 if |y| > L_max

    times ``factor``, added to the task score so that a response running into the length limit is punished
    gradually rather than cut off with the same score as a wrong one. Continuous: at |y| = L_max the ramp
    reaches -1.

    Args:
        lengths: (B,) response lengths in tokens (integer or float).
        max_length: L_max, the length at which the full penalty is reached.
        buffer: L_cache, the width of the ramp; 0 < buffer <= max_length.
        factor: the size of the full penalty (DAPO: 1).

    Returns:
        (B,) penalties in [-factor, 0], fp32 (float64 for float64 lengths).

    Raises:
        ValueError: a buffer outside (0, max_length], or a negative factor.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"buffer must be in (0, max_length={max_length}], got {buffer}")
    if factor < 0:
        raise ValueError(f"factor must be >= 0 (the penalty is subtracted), got {factor}")
    (lengths,) = upcast(lengths)
    start = max_length - buffer
    ramp = (start - lengths) / buffer
    return factor * torch.where(lengths <= start, 0.0, torch.clamp(ramp, min=-1.0))
