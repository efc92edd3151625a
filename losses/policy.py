"""The clipped policy loss of the critic-free online RL family: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++.

One function, ``clipped_policy_loss``, with the ppo family's call convention
``fn(logprobs, old_logprobs, advantages, mask, **kw)``, registered once per method with that paper's
defaults. The methods differ in four choices, each a keyword argument:

- the clip range of the ratio, [1 - eps_low, 1 + eps_high] (DAPO's clip-higher decouples the two), and an
  optional dual clip for negative advantages;
- the ratio per token, or per sequence (GSPO's length-normalised sequence likelihood ratio);
- how per-token losses are reduced to one number (``aggregate``): over every token of the batch, per
  sequence then over sequences, or summed per sequence over a constant length (Dr. GRPO);
- a KL penalty to the reference inside the loss (GRPO) rather than in the reward.

The advantages come from the estimator named by the objective's ``advantage`` (``losses.get_advantage``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kl import KL_ESTIMATORS, kl_penalty
from .masking import as_bool_mask, masked_mean, masked_sum, upcast
from .registry import Range, register

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
RATIO_LEVELS = ("token", "sequence")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def aggregation_unit(mode: str) -> str:
    """What a loss aggregated with ``mode`` is a mean over: "tokens" (token-mean) or "sequences" (seq-mean-*).

    To split a minibatch into micro-batches and get the full minibatch's loss and gradient, weight each
    micro-batch's loss by its share of the minibatch's units (``aggregation_count``), summed over every
    process: valid tokens for "tokens", rows with at least one valid token for "sequences".

    Args:
        mode: one of ``AGGREGATIONS``.

    Returns:
        "tokens" or "sequences".
    """
    _check_choice("aggregation", mode, AGGREGATIONS)
    return "tokens" if mode == "token-mean" else "sequences"


def aggregation_count(mask: Tensor, mode: str) -> Tensor:
    """The number of units ``aggregate(..., mode)`` averages over: the weight of a micro-batch.

    Args:
        mask: (B, R) True on valid tokens.
        mode: one of ``AGGREGATIONS``.

    Returns:
        A 0-d integer tensor: valid tokens (token-mean) or rows with a valid token (seq-mean-*).
    """
    mask = as_bool_mask(mask)
    return mask.sum() if aggregation_unit(mode) == "tokens" else mask.any(-1).sum()


def aggregate(per_token: Tensor, mask: Tensor, mode: str, *, max_length: int | None = None) -> Tensor:
    """Reduce per-token losses to one number, in one of the three ways the critic-free methods differ by.

    With l_it the loss of token t of row i, |o_i| the row's valid tokens and the means over rows taken over
    the rows with at least one valid token (a row whose mask is all False counts nothing):

    - "token-mean": sum_i sum_t l_it / sum_i |o_i| (DAPO, Yu et al. 2025, Sec. 3.3; PPO in lm-human-preferences);
    - "seq-mean-token-mean": mean_i (sum_t l_it / |o_i|) (GRPO, Shao et al. 2024, Eq. 3; GSPO);
    - "seq-mean-token-sum": mean_i (sum_t l_it / L), L a constant such as the generation budget (Dr. GRPO,
      Liu et al. 2025, Sec. 3.2: no length normalisation per response). verl calls this
      "seq-mean-token-sum-norm"; its "seq-mean-token-sum" is this with L = 1.

    Args:
        per_token: (B, R) per-token losses.
        mask: (B, R) True on valid tokens.
        mode: one of ``AGGREGATIONS``.
        max_length: L, required for "seq-mean-token-sum", ignored otherwise.

    Returns:
        A scalar; 0 when no token is valid.

    Raises:
        ValueError: an unknown mode, or "seq-mean-token-sum" without ``max_length``.
    """
    unit = aggregation_unit(mode)
    mask = as_bool_mask(mask)
    if unit == "tokens":
        return masked_mean(per_token, mask)
    lengths = mask.sum(-1)
    sums = masked_sum(per_token, mask, dim=-1)
    if mode == "seq-mean-token-mean":
        per_sequence = sums / lengths.clamp_min(1)
    else:
        if max_length is None:
            raise ValueError("aggregation 'seq-mean-token-sum' needs max_length, Dr. GRPO's constant L "
                             "(e.g. the generation budget max_new_tokens)")
        per_sequence = sums / max_length
    return per_sequence.sum() / (lengths > 0).sum().clamp_min(1)


_RANGES = {
    "clip_low": Range(gt=0, lt=1, why="eps_low: the ratio is clipped below at 1 - eps_low (typical: 0.2); "
                      "at 1 or more nothing is clipped below"),
    "clip_high": Range(gt=0, why="eps_high: the ratio is clipped above at 1 + eps_high (typical: 0.2; DAPO 0.28)"),
    "dual_clip": Range(gt=1, why="the cap c: a token with A < 0 loses at most -c A; at 1 or less the cap would "
                       "cut inside the clip range (typical: 3)"),
    "max_length": Range(gt=0, why="Dr. GRPO's constant L that per-sequence sums are divided by"),
    "kl_coef": Range(ge=0, why="the weight of KL(pi || ref) in the loss; a negative one would push the policy "
                     "away from the reference"),
}


@register("grpo", family="ppo", needs_reference=True, advantage="grpo", ranges=_RANGES, defaults={
    "clip_low": 0.2, "clip_high": 0.2, "aggregation": "seq-mean-token-mean", "kl_coef": 0.04, "kl_estimator": "k3"})
def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    aggregation: str = "token-mean",
    max_length: int | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL, aggregated by ``aggregation``.

    The objective of GRPO (Shao et al. 2024, DeepSeekMath, Eq. 3; KL estimator Eq. 4), with DAPO's
    clip-higher (Yu et al. 2025, Sec. 3.1: eps_high > eps_low lets unlikely tokens rise) and token-mean
    (Sec. 3.3), Dr. GRPO's constant-length sum (Liu et al. 2025), GSPO's sequence ratio (Zheng et al. 2025)
    and dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games", dual-clip PPO). With its own
    defaults it is PPO's clipped loss (Schulman et al. 2017, Eq. 7) with eps 0.2, as ``ppo_policy_loss``.

    - ratio_level "token": rho_t = exp(logp_t - old_logp_t).
    - ratio_level "sequence": s_i = exp(mean over row i's valid tokens of (logp - old_logp)), GSPO's
      length-normalised ratio, applied per token as sg[s_i] * exp(logp_t - sg[logp_t]) (GSPO-token): its
      value is s_i on every token and, with a per-row advantage and "seq-mean-token-mean", the loss and its
      gradient are GSPO's -mean_i min(s_i A_i, clip(s_i) A_i). With advantages that vary along a row the
      gradient is GSPO-token's, -A_it s_i per token, not the derivative of the returned value.
    - dual_clip c: for A < 0 the token's loss is min(loss, -c A), so a ratio far above 1 cannot make a
      negative-advantage token's loss unbounded.
    - KL: beta * k(logp, ref_logp) per token, aggregated as the surrogate (inside GRPO's per-response mean);
      k3 = exp(ref - logp) - (ref - logp) - 1 as DeepSeekMath.

    Args:
        logprobs: (B, R) per-token log-probs under the policy being trained.
        old_logprobs: (B, R) the same under the policy that generated the rollout.
        advantages: (B, R) per-token advantages, e.g. from ``grpo_advantages`` (one value per row).
        mask: (B, R) True on valid response tokens.
        clip_low: eps_low; the ratio is clipped below at 1 - eps_low.
        clip_high: eps_high; the ratio is clipped above at 1 + eps_high.
        dual_clip: c > 1, the cap -c A on the loss of tokens with A < 0; None for none.
        ratio_level: "token" or "sequence" (GSPO).
        aggregation: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum" (see ``aggregate``).
        max_length: L for "seq-mean-token-sum".
        ref_logprobs: (B, R) log-probs under the reference, for the KL term and its metric.
        kl_coef: beta, the weight of the KL term; > 0 needs ``ref_logprobs``.
        kl_estimator: "k1", "k2" or "k3" (``kl_penalty``).

    Returns:
        ``(loss, metrics)``: metrics ``loss/policy`` (the returned loss, KL term included),
        ``policy/clipfrac_low`` (share of valid tokens with A < 0 and ratio < 1 - eps_low),
        ``policy/clipfrac_high`` (A > 0 and ratio > 1 + eps_high), ``policy/clipfrac`` (their sum: the
        tokens whose gradient the clip removes), ``policy/approx_kl`` (0.5 mean of the token log-ratio
        squared, k2, as ``ppo_policy_loss``), ``policy/ratio`` (mean ratio), ``policy/kl_ref`` (token mean of
        the KL estimate, when ``ref_logprobs`` is given), ``policy/dual_clipfrac`` (share of valid tokens
        whose loss the dual clip caps, when ``dual_clip`` is set). All token means, detached.

    Raises:
        ValueError: an unknown ratio_level, aggregation or kl_estimator, kl_coef > 0 without
            ``ref_logprobs``, a dual_clip of 1 or less, or "seq-mean-token-sum" without ``max_length``.
    """
    _check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs, the reference model's per-token log-probs")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    mask = as_bool_mask(mask)
    logprobs, old_logprobs, advantages = upcast(logprobs, old_logprobs, advantages)
    logprobs = torch.where(mask, logprobs, 0)
    logratio = torch.where(mask, logprobs - old_logprobs, 0)
    advantages = torch.where(mask, advantages, 0)
    if ratio_level == "sequence":
        # log s_i on every token, with the gradient of logp_t: exp(log s_i) scales d logp_t by s_i (GSPO-token)
        sequence_logratio = masked_mean(logratio, mask, dim=-1)[:, None]
        logratio_used = logprobs - logprobs.detach() + sequence_logratio.detach()
        logratio_used = torch.where(mask, logratio_used, 0)
    else:
        logratio_used = logratio
    ratio = torch.exp(logratio_used)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg_losses, pg_losses_clipped)
    dtype = per_token.dtype
    optional = {}
    if dual_clip is not None:
        cap = -dual_clip * advantages
        capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(capped, cap, per_token)
        optional["policy/dual_clipfrac"] = masked_mean(capped.to(dtype), mask)
    loss = aggregate(per_token, mask, aggregation, max_length=max_length)
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs.to(dtype), estimator=kl_estimator, mask=mask)
        if kl_coef:
            loss = loss + kl_coef * aggregate(kl, mask, aggregation, max_length=max_length)
        optional["policy/kl_ref"] = masked_mean(kl, mask)
    clipped_low = (advantages < 0) & (ratio < 1.0 - clip_low)
    clipped_high = (advantages > 0) & (ratio > 1.0 + clip_high)
    metrics = {
        "loss/policy": loss,
        "policy/clipfrac_low": masked_mean(clipped_low.to(dtype), mask),
        "policy/clipfrac_high": masked_mean(clipped_high.to(dtype), mask),
        "policy/clipfrac": masked_mean((clipped_low | clipped_high).to(dtype), mask),
        "policy/approx_kl": 0.5 * masked_mean(logratio.square(), mask),
        "policy/ratio": masked_mean(ratio, mask),
        **optional,
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


# The paper defaults of each method; every other keyword keeps the function's default.
register("dr_grpo", family="ppo", advantage="dr_grpo", defaults={
    "clip_low": 0.2, "clip_high": 0.2, "aggregation": "seq-mean-token-sum", "kl_coef": 0.0})(clipped_policy_loss)
register("dapo", family="ppo", advantage="grpo", defaults={
    "clip_low": 0.2, "clip_high": 0.28, "aggregation": "token-mean", "kl_coef": 0.0})(clipped_policy_loss)
register("gspo", family="ppo", advantage="grpo", defaults={
    "ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "aggregation": "seq-mean-token-mean",
    "kl_coef": 0.0})(clipped_policy_loss)
# RLOO is REINFORCE on whole responses, grad log pi(y|x) = sum_t grad logp_t, averaged over responses: that is
# seq-mean-token-sum up to the constant 1/L (a learning-rate scale). Its KL is in the reward, hence the reference.
register("rloo", family="ppo", needs_reference=True, advantage="rloo", defaults={
    "clip_low": 0.2, "clip_high": 0.2, "aggregation": "seq-mean-token-sum", "kl_coef": 0.0})(clipped_policy_loss)
# REINFORCE++ keeps PPO's clip and token-mean; its KL is in the per-token reward, hence the reference.
register("reinforce_pp", family="ppo", needs_reference=True, advantage="reinforce_pp", defaults={
    "clip_low": 0.2, "clip_high": 0.2, "aggregation": "token-mean", "kl_coef": 0.0})(clipped_policy_loss)
