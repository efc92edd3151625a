"""PPO's clipped surrogate objective and clipped value loss, over the valid tokens of a batch."""

from __future__ import annotations

import torch
from torch import Tensor

from .masking import as_bool_mask, masked_mean, upcast
from .registry import Range, register


@register("ppo", family="ppo", needs_reference=True, advantage="gae",
          ranges={"clip_coef": Range(gt=0, why="the trust region around ratio 1 (typical: 0.1 to 0.3)")})
def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, clip_coef: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss, -min(ratio A, clip(ratio, 1-eps, 1+eps) A) (Schulman et al. 2017, Eq. 7).

    The loss is the token-weighted mean over every valid token of the batch, as lm-human-preferences
    and TRL; split into micro-batches, weight each by its token count over the total. The registry
    records ``needs_reference=True`` because the rewards PPO optimises are KL-shaped.

    Args:
        logprobs: (B, R) per-token log-probs under the policy being trained.
        old_logprobs: (B, R) the same under the policy that generated the rollout.
        advantages: (B, R) advantage estimates (usually whitened GAE).
        mask: (B, R) True on valid response tokens.
        clip_coef: eps, the clipping range of the probability ratio.

    Returns:
        ``(loss, metrics)``: metrics ``loss/policy``, ``policy/clipfrac`` (fraction of tokens where the
        clipped term is the larger loss, as lm-human-preferences), ``policy/approx_kl``
        (0.5 * mean logratio^2, the k2 estimator), ``policy/ratio`` (mean ratio).
    """
    mask = as_bool_mask(mask)
    logprobs, old_logprobs, advantages = upcast(logprobs, old_logprobs, advantages)
    logratio = torch.where(mask, logprobs - old_logprobs, 0)
    advantages = torch.where(mask, advantages, 0)
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    pg_loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask)
    metrics = {
        "loss/policy": pg_loss,
        "policy/clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(pg_loss.dtype), mask),
        "policy/approx_kl": 0.5 * masked_mean(logratio.square(), mask),
        "policy/ratio": masked_mean(ratio, mask),
    }
    return pg_loss, {k: v.detach() for k, v in metrics.items()}


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip_coef: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, 0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

    Not in the PPO paper: value clipping comes from OpenAI baselines' PPO2 and lm-human-preferences
    (Ziegler et al. 2019), studied in Engstrom et al. 2020, "Implementation Matters", Section 3.

    Args:
        values: (B, R) value predictions of the model being trained.
        old_values: (B, R) value predictions recorded with the rollout.
        returns: (B, R) targets, e.g. the returns from ``gae``.
        mask: (B, R) True on valid response tokens.
        clip_coef: eps, the range around ``old_values`` that the clipped prediction stays in.

    Returns:
        ``(loss, metrics)``: token-weighted masked mean; metrics ``loss/value``, ``val/clipfrac``
        (fraction of tokens where the clipped error is the larger), ``val/vpred`` (mean prediction),
        ``val/error`` (mean squared error of the unclipped prediction).
    """
    mask = as_bool_mask(mask)
    values, old_values, returns = upcast(values, old_values, returns)
    values = torch.where(mask, values, 0)
    old_values = torch.where(mask, old_values, 0)
    returns = torch.where(mask, returns, 0)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_coef, clip_coef)
    vf_losses = (values - returns).square()
    vf_losses_clipped = (values_clipped - returns).square()
    vf_loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), mask)
    metrics = {
        "loss/value": vf_loss,
        "val/clipfrac": masked_mean((vf_losses_clipped > vf_losses).to(vf_loss.dtype), mask),
        "val/vpred": masked_mean(values, mask),
        "val/error": masked_mean(vf_losses, mask),
    }
    return vf_loss, {k: v.detach() for k, v in metrics.items()}
