"""Advantage estimators over right-padded response tokens: GAE with a critic, and the critic-free family
(GRPO, Dr. GRPO, RLOO, REINFORCE++), registered by name with what each needs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .masking import as_bool_mask, masked_mean, masked_sum, masked_var, upcast
from .registry import _did_you_mean


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


# --- Advantage estimators by name ---------------------------------------------------------------------------
#
# One call convention for every estimator (shapes as in ``losses/__init__.py``):
#
#   fn(rewards, mask, *, group_size, values=None, gamma=1.0, lam=0.95, eps=1e-6) -> (advantages, returns, metrics)
#
# rewards (B, R): per-token rewards, the sequence score on the last valid token plus any per-token KL shaping
# (``kl_shaped_rewards``); mask (B, R) bool; rows [g*G, (g+1)*G) are the G responses to one prompt.
# advantages (B, R) and returns (B, R) or None are 0 on padding; metrics are detached, namespaced scalars.


@dataclass(frozen=True)
class Estimator:
    """A registered advantage estimator and what the loop must provide and do around it.

    There is no ``needs_reference``: no estimator reads the reference, since a method's KL is either already
    in the per-token rewards it is given or in the loss; ``Objective.needs_reference`` says which.
    """

    name: str
    fn: Callable[..., tuple[Tensor, Tensor | None, dict[str, Tensor]]]
    needs_critic: bool
    """Whether the loop must train a value function and pass its ``values``."""
    whiten: bool
    """Whether the loop whitens the advantages over the whole rollout batch (every process), as PPO does for
    GAE; False for the group-normalised estimators, whose advantages are already on their own scale."""
    kl_coef: float = 0.0
    """The default coefficient of the per-token KL penalty in the rewards (the engine's ``ppo.kl_coef: null``):
    0.05 for GAE (Ziegler et al. 2019) and RLOO (Ahmadian et al. 2024), 0.01 for REINFORCE++ (Hu 2025); 0 for
    GRPO and Dr. GRPO, whose KL, if any, is in the loss."""
    min_group_size: int = 1
    """The smallest group a baseline can be formed from: 2 for the group estimators, 1 for GAE."""
    doc: str = ""
    """One line for listings: the first line of the function's docstring."""


_ESTIMATORS: dict[str, Estimator] = {}


def register_advantage(
    name: str, *, needs_critic: bool, whiten: bool, kl_coef: float = 0.0, min_group_size: int = 1
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers ``fn`` as the advantage estimator ``name``; the function is returned unchanged.

    Args:
        name: registry key; must not already name a different function.
        needs_critic: whether the estimator reads ``values`` from a critic.
        whiten: whether the loop whitens its advantages over the global batch.
        kl_coef: the default per-token KL coefficient in the rewards (see ``Estimator.kl_coef``).
        min_group_size: the smallest ``group_size`` the estimator takes.

    Returns:
        The decorator.
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        existing = _ESTIMATORS.get(name)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered for {existing.fn.__qualname__}")
        doc = (inspect.getdoc(fn) or "").partition("\n")[0]
        _ESTIMATORS[name] = Estimator(name=name, fn=fn, needs_critic=needs_critic, whiten=whiten, kl_coef=kl_coef,
                                      min_group_size=min_group_size, doc=doc)
        return fn

    return decorator


def get_advantage(name: str) -> Estimator:
    """Look up an advantage estimator by name ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", ...).

    Raises:
        ValueError: unknown name; the message names the nearest registered one and lists them all.
    """
    if name not in _ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}{_did_you_mean(name, _ESTIMATORS)}; "
            f"registered: {', '.join(sorted(_ESTIMATORS))}"
        )
    return _ESTIMATORS[name]


def list_advantages() -> list[Estimator]:
    """All registered advantage estimators, sorted by name."""
    return [_ESTIMATORS[name] for name in sorted(_ESTIMATORS)]


def _advantage_metrics(advantages: Tensor, mask: Tensor) -> dict[str, Tensor]:
    return {
        "advantages/mean": masked_mean(advantages, mask).detach(),
        "advantages/std": masked_var(advantages, mask).sqrt().detach(),
    }


def _check_groups(mask: Tensor, group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if mask.shape[0] % group_size:
        raise ValueError(f"the batch of {mask.shape[0]} rows is not a whole number of groups of {group_size}")


def _grouped_scores(rewards: Tensor, mask: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sequence rewards r_i = sum_t rewards_t as (groups, G), with each row's validity and each group's
    count n and mean over its valid rows (a row with no valid token is left out of both)."""
    _check_groups(mask, group_size)
    (rewards,) = upcast(rewards)
    scores = masked_sum(rewards, mask, dim=-1).view(-1, group_size)
    valid = mask.any(-1).view(-1, group_size)
    count = valid.sum(-1, keepdim=True)
    mean = torch.where(valid, scores, 0).sum(-1, keepdim=True) / count.clamp_min(1)
    return scores, valid, count, mean


def _broadcast(sequence_advantages: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-row advantages (groups, G) to every valid token (B, R), with the metrics of every estimator."""
    advantages = torch.where(mask, sequence_advantages.reshape(-1, 1), 0)
    metrics = _advantage_metrics(advantages, mask)
    return advantages, metrics


def _zero_std_groups(scores: Tensor, valid: Tensor, mean: Tensor) -> Tensor:
    """Share of the groups with a valid row whose valid rows all score the same: they give no gradient."""
    spread = torch.where(valid, (scores - mean).abs(), 0).amax(-1)
    has_rows = valid.any(-1)
    return ((spread == 0) & has_rows).sum().to(scores.dtype).div(has_rows.sum().clamp_min(1)).detach()


@register_advantage("gae", needs_critic=True, whiten=True, kl_coef=0.05)
def gae_advantages(
    rewards: Tensor, mask: Tensor, *, group_size: int, values: Tensor | None = None, gamma: float = 1.0,
    lam: float = 0.95, eps: float = 1e-6,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """GAE(gamma, lambda) from a critic's values (Schulman et al. 2016, Eq. 16), in the estimators' convention.

    ``gae`` under the common signature; ``group_size`` is only checked (B % G == 0) and ``eps`` unused.

    Args:
        rewards: (B, R) per-token rewards (score on the last valid token, KL shaping on every token).
        mask: (B, R) True on valid response tokens.
        group_size: G, responses per prompt.
        values: (B, R) the critic's V_t; required.
        gamma, lam: discount and GAE lambda.
        eps: unused.

    Returns:
        ``(advantages, returns, metrics)``: (B, R) unwhitened advantages, returns = advantages + values,
        metrics ``advantages/mean``, ``advantages/std`` over valid tokens.
    """
    mask = as_bool_mask(mask)
    _check_groups(mask, group_size)
    if values is None:
        raise ValueError("the gae advantage estimator needs the critic's values")
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    return advantages, returns, _advantage_metrics(advantages, mask)


@register_advantage("grpo", needs_critic=False, whiten=False, min_group_size=2)
def grpo_advantages(
    rewards: Tensor, mask: Tensor, *, group_size: int, values: Tensor | None = None, gamma: float = 1.0,
    lam: float = 0.95, eps: float = 1e-6,
) -> tuple[Tensor, None, dict[str, Tensor]]:
    """Group-normalised reward, A_i = (r_i - mean(r)) / (std(r) + eps) (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2).

    Outcome supervision: every token of response i gets A_i, r_i being the sum of its per-token rewards (the
    score, plus the KL shaping if any). std has Bessel's correction (n - 1), as ``torch.std`` in TRL's GRPO and
    DeepSeekMath's implementations. Rows with no valid token are left out of their group's mean and std; a
    group with one valid row has std 0 and gives A = 0, as a group whose rows all score the same does.

    Args:
        rewards: (B, R) per-token rewards.
        mask: (B, R) True on valid response tokens.
        group_size: G; rows [g*G, (g+1)*G) answer one prompt. B % G must be 0.
        values, gamma, lam: unused (the common signature).
        eps: added to the std (verl's default 1e-6).

    Returns:
        ``(advantages, None, metrics)``: (B, R), 0 on padding; metrics ``advantages/mean``,
        ``advantages/std`` over valid tokens and ``advantages/zero_std_groups`` (share of groups whose
        valid rows all score the same, which teach nothing).
    """
    mask = as_bool_mask(mask)
    scores, valid, count, mean = _grouped_scores(rewards, mask, group_size)
    centred = torch.where(valid, scores - mean, 0)
    std = (centred.square().sum(-1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
    advantages, metrics = _broadcast(centred / (std + eps), mask)
    return advantages, None, {**metrics, "advantages/zero_std_groups": _zero_std_groups(scores, valid, mean)}


@register_advantage("dr_grpo", needs_critic=False, whiten=False, min_group_size=2)
def dr_grpo_advantages(
    rewards: Tensor, mask: Tensor, *, group_size: int, values: Tensor | None = None, gamma: float = 1.0,
    lam: float = 0.95, eps: float = 1e-6,
) -> tuple[Tensor, None, dict[str, Tensor]]:
    """Group-centred reward, A_i = r_i - mean(r) (Liu et al. 2025, "Understanding R1-Zero-Like Training", Sec. 3.2).

    GRPO without the division by the group's std, which Dr. GRPO shows biases updates towards prompts that
    are nearly always or never solved. Rows with no valid token are left out of the group mean.

    Args:
        rewards: (B, R) per-token rewards; r_i is the row's sum.
        mask: (B, R) True on valid response tokens.
        group_size: G; rows [g*G, (g+1)*G) answer one prompt. B % G must be 0.
        values, gamma, lam, eps: unused (the common signature).

    Returns:
        ``(advantages, None, metrics)``: (B, R), 0 on padding; metrics as ``grpo_advantages``.
    """
    mask = as_bool_mask(mask)
    scores, valid, _, mean = _grouped_scores(rewards, mask, group_size)
    advantages, metrics = _broadcast(torch.where(valid, scores - mean, 0), mask)
    return advantages, None, {**metrics, "advantages/zero_std_groups": _zero_std_groups(scores, valid, mean)}


@register_advantage("rloo", needs_critic=False, whiten=False, kl_coef=0.05, min_group_size=2)
def rloo_advantages(
    rewards: Tensor, mask: Tensor, *, group_size: int, values: Tensor | None = None, gamma: float = 1.0,
    lam: float = 0.95, eps: float = 1e-6,
) -> tuple[Tensor, None, dict[str, Tensor]]:
    """Leave-one-out baseline, A_i = r_i - sum_{j != i} r_j / (G - 1) (Ahmadian et al. 2024, "Back to Basics").

    The baseline of each response is the mean reward of the other responses to its prompt (Kool et al. 2019,
    "Buy 4 REINFORCE samples, get a baseline for free!"), so it does not depend on the response itself and
    the estimate stays unbiased; equal to G / (G - 1) (r_i - mean(r)).
    Rows with no valid token are left out: G becomes the group's count n of valid rows, and a group with a
    single valid row (no other response to compare with) gives A = 0.

    Args:
        rewards: (B, R) per-token rewards; r_i is the row's sum.
        mask: (B, R) True on valid response tokens.
        group_size: G >= 2; rows [g*G, (g+1)*G) answer one prompt. B % G must be 0.
        values, gamma, lam, eps: unused (the common signature).

    Returns:
        ``(advantages, None, metrics)``: (B, R), 0 on padding; metrics as ``grpo_advantages``.

    Raises:
        ValueError: group_size 1 (no other response to form the baseline).
    """
    if group_size == 1:
        raise ValueError("rloo needs at least 2 responses per prompt (group_size >= 2) for its leave-one-out baseline")
    mask = as_bool_mask(mask)
    scores, valid, count, mean = _grouped_scores(rewards, mask, group_size)
    others = (count * mean - scores) / (count - 1).clamp_min(1)
    advantages, metrics = _broadcast(torch.where(valid & (count > 1), scores - others, 0), mask)
    return advantages, None, {**metrics, "advantages/zero_std_groups": _zero_std_groups(scores, valid, mean)}


@register_advantage("reinforce_pp", needs_critic=False, whiten=True, kl_coef=0.01)
def reinforce_pp_advantages(
    rewards: Tensor, mask: Tensor, *, group_size: int, values: Tensor | None = None, gamma: float = 1.0,
    lam: float = 0.95, eps: float = 1e-6,
) -> tuple[Tensor, None, dict[str, Tensor]]:
    """Discounted reward-to-go, A_t = G_t = sum_{s >= t} gamma^(s - t) r_s (Hu 2025, REINFORCE++, Sec. 3).

    The per-token rewards carry the KL penalty (REINFORCE++ puts it in the reward, not the loss), so each
    token's return is the score minus the KL still to come. Returned unwhitened: the estimator is registered
    with ``whiten=True`` and the loop normalises over the whole rollout batch, every process, as PPO does for
    GAE (REINFORCE++'s global batch normalisation). ``group_size`` is only checked.

    Args:
        rewards: (B, R) per-token rewards.
        mask: (B, R) right-padded, True on valid response tokens.
        group_size: G, responses per prompt (any divisor of B; 1 is fine).
        values, lam, eps: unused (the common signature).
        gamma: discount factor.

    Returns:
        ``(advantages, None, metrics)``: (B, R) returns G_t, 0 on padding; metrics ``advantages/mean``,
        ``advantages/std`` over valid tokens.
    """
    mask = as_bool_mask(mask)
    _check_groups(mask, group_size)
    (rewards,) = upcast(rewards)
    rewards = torch.where(mask, rewards, 0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, 0)
        returns[:, t] = running
    return returns, None, _advantage_metrics(returns, mask)
