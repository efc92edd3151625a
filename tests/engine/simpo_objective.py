"""SimPO, defined outside the library and trained through the config alone:

    objective: {name: "tests.engine.simpo_objective:simpo_loss", beta: 2.0, gamma: 0.5}
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from losses import masked_mean, preference_metrics, register


@register("simpo", family="pairwise", needs_reference=False)
def simpo_loss(
    chosen_logprobs: Tensor,
    chosen_mask: Tensor,
    rejected_logprobs: Tensor,
    rejected_mask: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Simple Preference Optimization, -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)
    (Meng et al. 2024, Eq. 6): the length-normalised log-likelihood is the implicit reward; no reference.

    Args:
        chosen_logprobs, rejected_logprobs: (B, T) per-token log-probs of each sequence.
        chosen_mask, rejected_mask: (B, T) True on the response tokens.
        beta: reward scale.
        gamma: target reward margin.

    Returns:
        ``(loss, metrics)``: the mean over pairs; metrics from ``preference_metrics``.
    """
    chosen = masked_mean(chosen_logprobs.float(), chosen_mask, dim=-1)
    rejected = masked_mean(rejected_logprobs.float(), rejected_mask, dim=-1)
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return losses.mean(), preference_metrics(beta * chosen, beta * rejected, chosen, rejected)
