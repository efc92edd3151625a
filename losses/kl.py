"""KL penalties between the policy and the reference, and the controllers of their coefficient."""

from __future__ import annotations

import torch
from torch import Tensor

from .masking import as_bool_mask, upcast

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, *, estimator: str = "k1", mask: Tensor | None = None
) -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman 2020, "Approximating KL Divergence").

    With x = log pi(a) - log ref(a) for a ~ pi: k1 = x (unbiased, high variance), k2 = x^2 / 2
    (biased, low variance), k3 = (r - 1) - log r with r = ref/pi = exp(-x), i.e. expm1(-x) + x
    (unbiased and never negative).

    Args:
        logprobs: (B, R) per-token log-probs of the sampled tokens under the policy.
        ref_logprobs: (B, R) the same under the reference.
        estimator: "k1", "k2" or "k3".
        mask: optional (B, R); where False the result is 0 and the inputs are never read, not even
            through exp.

    Returns:
        (B, R) per-token KL estimates.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    logprobs, ref_logprobs = upcast(logprobs, ref_logprobs)
    x = logprobs - ref_logprobs
    if mask is not None:
        x = torch.where(as_bool_mask(mask), x, 0)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x.square()
    return torch.expm1(-x) + x


def kl_shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float | Tensor,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF rewards R = score - kl_coef * KL (Ziegler et al. 2019, Eq. 2), as a dense (B, R) tensor.

    Convention: every valid token gets -kl_coef * k; the sequence-level score is added on the last
    valid token of each row (the token that ended the response, EOS included when generated), as
    OpenRLHF and TRL's PPO trainer do. lm-human-preferences adds it at position R - 1, the same
    thing for its fixed-length responses. A row without any valid token gets no score.

    Args:
        scores: (B,) reward-model or reward-function scores of the responses.
        logprobs: (B, R) per-token log-probs of the response under the rollout policy.
        ref_logprobs: (B, R) the same under the reference model.
        mask: (B, R) right-padded response mask, True on valid tokens.
        kl_coef: beta, a float or a 0-d tensor (e.g. ``AdaptiveKLController.value``).
        estimator: see ``kl_penalty``.

    Returns:
        ``(rewards, kl)``, each (B, R), 0 on padding.
    """
    mask = as_bool_mask(mask)
    kl = kl_penalty(logprobs, ref_logprobs, estimator=estimator, mask=mask)
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=-1)
    score = torch.where(last >= 0, scores.to(rewards.dtype), 0)
    rewards = rewards.scatter_add(-1, last.clamp_min(0)[:, None], score[:, None])
    return rewards, kl


class FixedKLController:
    """A constant KL coefficient, with the same interface as ``AdaptiveKLController``."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Leave the coefficient unchanged."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL to a target (Ziegler et al. 2019, Section 2.2).

    error = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Update the coefficient after ``n_steps`` samples (episodes) whose mean KL was ``current_kl``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
