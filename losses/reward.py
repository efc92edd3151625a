"""Reward models trained on preference pairs (Bradley-Terry)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .masking import upcast
from .registry import Range, register


@register("reward", family="reward",
          ranges={"center_coef": Range(ge=0, why="a negative weight pushes rewards away from zero")})
def pairwise_reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry loss -log sigma(r_c - r_r - m) of InstructGPT (Ouyang et al. 2022, Eq. 1).

    The optional margin m is Llama 2's (Touvron et al. 2023, Eq. 2); the centring term
    ``center_coef * mean (r_c + r_r)^2`` keeps rewards near zero (Eisenstein et al. 2023), as TRL's
    ``center_rewards_coefficient``.

    Args:
        chosen_rewards: (B,) scalar rewards of the preferred responses.
        rejected_rewards: (B,) scalar rewards of the other responses.
        margin: (B,) optional preference strength, subtracted from the reward difference.
        center_coef: weight of the centring term (0 turns it off).

    Returns:
        ``(loss, metrics)``: mean softplus(-(r_c - r_r - m)) + center_coef * mean (r_c + r_r)^2;
        metrics ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (means),
        ``rewards/accuracies`` (fraction with r_c > r_r, strictly).
    """
    chosen, rejected = upcast(chosen_rewards, rejected_rewards)
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = F.softplus(-diff).mean()
    if center_coef:
        loss = loss + center_coef * (chosen + rejected).square().mean()
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}
