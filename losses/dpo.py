"""Preference optimisation against a frozen reference: DPO, conservative DPO, soft-label DPO, IPO and the hinge loss.

All of them take per-sequence log-probs (B,) of the policy and of the reference for the chosen and
rejected responses and work on the same quantity, the difference of log-ratios

    D = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)).

Implicit rewards for the metrics are beta * (log pi(y) - log ref(y)) (Rafailov et al. 2023, Section 4).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .masking import upcast
from .registry import Range, register
from .reward import soft_preference_nll


def preference_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, Tensor]:
    """The metrics every pairwise objective logs, as detached batch means.

    Args:
        chosen_rewards, rejected_rewards: (B,) implicit rewards of each response.
        chosen_logps, rejected_logps: (B,) the policy's log-probs of each response.

    Returns:
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``
        (fraction with chosen > rejected, strictly), ``logps/chosen``, ``logps/rejected``.
    """
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }
    return {k: v.detach() for k, v in metrics.items()}


def _logratios(*logps: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = upcast(*logps)
    return policy_chosen, policy_rejected, policy_chosen - ref_chosen, policy_rejected - ref_rejected


# beta <= 0 prefers the rejected response (or learns nothing) while the logged accuracy looks fine; a label
# smoothing of 0.5 makes the loss symmetric in chosen and rejected.
BETA = Range(gt=0, why="it scales the log-ratio margin; 0 learns nothing and a negative beta prefers the "
             "rejected response (typical: 0.01 to 0.5)")
_DPO_RANGES = {"beta": BETA, "label_smoothing": Range(ge=0, lt=0.5, why="the assumed fraction of flipped labels; "
                                                      "0.5 or more learns nothing or the reverse")}


@register("dpo", family="pairwise", needs_reference=True, ranges=_DPO_RANGES)
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Preference Optimization, -log sigma(beta * D) (Rafailov et al. 2023, Eq. 7).

    With label_smoothing e > 0 this is conservative DPO (Mitchell 2023, "A note on DPO with noisy
    preferences"): each label is flipped with probability e, giving (1-e) softplus(-beta D) +
    e softplus(beta D). e = 0 is plain DPO.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference model.
        beta: inverse temperature of the implicit reward (strength of the KL constraint).
        label_smoothing: e, the assumed probability that a preference label is wrong.

    Returns:
        ``(loss, metrics)``: the mean over pairs; metrics from ``preference_metrics``.
    """
    policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = (1 - label_smoothing) * F.softplus(-logits) + label_smoothing * F.softplus(logits)
    metrics = preference_metrics(
        beta * chosen_logratios, beta * rejected_logratios, policy_chosen, policy_rejected
    )
    return losses.mean(), metrics


register("cdpo", family="pairwise", needs_reference=True, defaults={"label_smoothing": 0.1})(dpo_loss)


@register("soft_dpo", family="pairwise", needs_reference=True, ranges={"beta": BETA})
def soft_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    soft_label: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO against a per-pair soft label: p softplus(-beta D) + (1 - p) softplus(beta D).

    This is conservative DPO (Mitchell 2023) with a label-smoothing e = 1 - p of each pair's own, the
    cross-entropy of DPO's Bradley-Terry model (Rafailov et al. 2023, Eq. 7) against the preference
    probability p that an AI judge gives the pair (Lee et al. 2023, RLAIF, Sec. 2.2, where the reward
    model is trained on such soft labels). p = 1 is plain DPO; p = 0.5 pulls D to 0 (no preference);
    in between beta * D is pulled to log(p / (1 - p)), never to infinity.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference model.
        beta: inverse temperature of the implicit reward (strength of the KL constraint).
        soft_label: (B,) p in [0, 1] per pair, from the data's ``soft_label`` column; None: p = 1.

    Returns:
        ``(loss, metrics)``: the mean over pairs; metrics from ``preference_metrics`` and
        ``labels/soft_label`` (mean p).
    """
    policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = soft_preference_nll(logits, soft_label)
    metrics = preference_metrics(
        beta * chosen_logratios, beta * rejected_logratios, policy_chosen, policy_rejected
    )
    p = soft_label.to(logits.dtype) if soft_label is not None else logits.new_ones(logits.shape)
    metrics["labels/soft_label"] = p.mean().detach()
    return losses.mean(), metrics


@register("ipo", family="pairwise", needs_reference=True, logps_reduction="mean", ranges={"beta": BETA})
def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Identity Preference Optimisation, (D - 1/(2 beta))^2 (Azar et al. 2023, Eq. 17; beta is their tau).

    Convention: the function takes whatever per-sequence log-probs the caller reduced. The paper
    writes D with sequence log-probs (sums); the registered ``ipo`` objective asks the engine for
    per-token means (``logps_reduction="mean"``, length-normalised IPO, as TRL's ``loss_type="ipo"``),
    which keeps D on the scale of the fixed target 1/(2 beta) whatever the response length.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) response log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference, reduced alike.
        beta: regularisation strength; the loss pulls D towards 1/(2 beta).

    Returns:
        ``(loss, metrics)``: the mean over pairs; metrics from ``preference_metrics``.
    """
    policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)).square()
    metrics = preference_metrics(
        beta * chosen_logratios, beta * rejected_logratios, policy_chosen, policy_rejected
    )
    return losses.mean(), metrics


@register("hinge", family="pairwise", needs_reference=True, ranges={"beta": BETA})
def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hinge loss relu(1 - beta * D): SLiC-HF's calibration loss (Zhao et al. 2023) on reference log-ratios.

    This is the "hinge-norm" form of RSO (Liu et al. 2024), which normalises the SLiC margin by the
    reference model; 1/beta plays the role of SLiC's margin delta.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference model.
        beta: scale of D; pairs with beta * D >= 1 give no gradient.

    Returns:
        ``(loss, metrics)``: the mean over pairs; metrics from ``preference_metrics``.
    """
    policy_chosen, policy_rejected, chosen_logratios, rejected_logratios = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = F.relu(1 - beta * (chosen_logratios - rejected_logratios))
    metrics = preference_metrics(
        beta * chosen_logratios, beta * rejected_logratios, policy_chosen, policy_rejected
    )
    return losses.mean(), metrics
