"""Generalized Advantage Estimation over right-padded response tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from .masking import as_bool_mask, upcast


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda): A_t = sum_l (gamma lam)^l delta_{t+l} (Schulman et al. 2016, Eq. 16).

    delta_t = r_t + gamma V_{t+1} - V_t, with V after the last valid token taken as 0 (the episode
    ends with the response). Advantages are returned unwhitened: whiten them with
    ``masked_whiten`` where the recipe does.

    Args:
        rewards: (B, R) per-token rewards, e.g. from ``kl_shaped_rewards``.
        values: (B, R) value estimates V_t of the rollout.
        mask: (B, R) right-padded response mask, True on valid tokens.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, each (B, R), returns = advantages + values; 0 on padding.
    """
    mask = as_bool_mask(mask)
    rewards, values = upcast(rewards, values)
    rewards = torch.where(mask, rewards, 0)
    values = torch.where(mask, values, 0)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(mask[:, t], delta + gamma * lam * next_advantage, 0)
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = torch.where(mask, advantages + values, 0)
    return advantages, returns
