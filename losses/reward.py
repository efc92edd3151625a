"""Reward models trained on preference pairs (Bradley-Terry)."""

from __future__ import annotations

import torch
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


def soft_preference_nll(logits: Tensor, soft_label: Tensor | None) -> Tensor:
    """Per-pair cross-entropy of a Bradley-Terry model against a probabilistic target.

    -(p log sigma(x) + (1 - p) log sigma(-x)) = p softplus(-x) + (1 - p) softplus(x), which equals
    softplus(-x) + (1 - p) x: its gradient in x is sigma(x) - p, zero at x = log(p / (1 - p)). p = 1 is
    the hard loss softplus(-x); p = 0.5 is minimised at x = 0, with value log 2 there.

    Args:
        logits: (B,) x, the preference log-odds the model assigns to "chosen beats rejected".
        soft_label: (B,) p in [0, 1], the probability that chosen is preferred; None: p = 1 for every pair.

    Returns:
        (B,) the per-pair loss, in the dtype of `logits`.
    """
    if soft_label is None:
        return F.softplus(-logits)
    p = soft_label.to(logits.dtype)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


@register("soft_reward", family="reward",
          ranges={"center_coef": Range(ge=0, why="a negative weight pushes rewards away from zero")})
def soft_reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    soft_label: Tensor | None = None,
    margin: Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry with a probabilistic target: -(p log sigma(d) + (1 - p) log sigma(-d)), d = r_c - r_r.

    The soft label p is the probability that chosen is preferred, as an AI judge's normalised label
    probabilities give it (Lee et al. 2023, RLAIF, Sec. 2.2: the reward model is trained on the soft
    preference distribution). It is the cross-entropy of the Bradley-Terry model (Ouyang et al. 2022,
    Eq. 1) against that target, so p = 1 is ``pairwise_reward_loss``; the reward difference is pulled to
    log(p / (1 - p)) rather than to infinity. The optional margin m is subtracted from d first, and
    ``center_coef`` adds center_coef * mean (r_c + r_r)^2, both as in ``pairwise_reward_loss``.

    Args:
        chosen_rewards: (B,) scalar rewards of the responses the label prefers.
        rejected_rewards: (B,) scalar rewards of the other responses.
        soft_label: (B,) p in [0, 1] per pair, from the data's ``soft_label`` column; None: p = 1.
        margin: (B,) optional preference strength, subtracted from the reward difference.
        center_coef: weight of the centring term (0 turns it off).

    Returns:
        ``(loss, metrics)``: mean over pairs of ``soft_preference_nll(d - m, p)`` + the centring term;
        metrics as ``pairwise_reward_loss`` (accuracy: r_c > r_r) and ``labels/soft_label`` (mean p).
    """
    chosen, rejected = upcast(chosen_rewards, rejected_rewards)
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = soft_preference_nll(diff, soft_label).mean()
    if center_coef:
        loss = loss + center_coef * (chosen + rejected).square().mean()
    p = soft_label.to(chosen.dtype) if soft_label is not None else torch.ones_like(chosen)
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
        "labels/soft_label": p.mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}
