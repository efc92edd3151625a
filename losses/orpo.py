"""Odds Ratio Preference Optimization: SFT plus an odds-ratio penalty, without a reference model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .dpo import preference_metrics
from .masking import as_bool_mask, masked_mean, upcast
from .registry import Range, register

_LOG_HALF = -math.log(2.0)


def log1m_exp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and far below it (Maechler 2012, "log1mexp").

    Near 0, 1 - exp(x) cancels and ``log(-expm1(x))`` is exact; far below, exp(x) underflows
    relative to 1 and ``log1p(-exp(x))`` is exact. The switch is at x = -log 2.
    """
    # Each branch is evaluated on inputs clamped into its own half, so the branch that torch.where
    # discards never produces an inf whose zero gradient would turn into NaN.
    near_zero = torch.log(-torch.expm1(x.clamp(min=_LOG_HALF)))
    far = torch.log1p(-torch.exp(x.clamp(max=_LOG_HALF)))
    return torch.where(x > _LOG_HALF, near_zero, far)


@register("orpo", family="pairwise", ranges={"lam": Range(ge=0, why="the weight of the odds-ratio term; a "
                                                      "negative one rewards the rejected response")})
def orpo_loss(
    chosen_logprobs: Tensor,
    chosen_mask: Tensor,
    rejected_logprobs: Tensor,
    rejected_mask: Tensor,
    *,
    lam: float,
    sft_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO, L_SFT + lam * L_OR with L_OR = -log sigma(log odds ratio) (Hong et al. 2024, Eqs. 6-7).

    P(y|x) is the exponentiated mean per-token log-prob of the response and odds(y) = P / (1 - P)
    (Eq. 4), so log odds = lp - log(1 - exp(lp)), computed with ``log1m_exp`` to stay finite and
    accurate as lp -> 0 (a confident model) and as lp -> -inf.

    Convention: L_SFT is a token-level mean NLL over the whole batch under ``sft_mask``. By default
    that is ``chosen_mask``, the response only, as in the paper. The official code (and TRL) trains
    the NLL on prompt and response: pass log-probs over the full sequence with ``chosen_mask`` on the
    response and ``sft_mask`` on prompt and response. The NLL is token-weighted and L_OR pair-weighted,
    so micro-batches with different token counts do not average back exactly to the full batch.

    Args:
        chosen_logprobs: (B, R) per-token log-probs of the chosen sequence.
        chosen_mask: (B, R) True on the chosen response tokens (at least one per row).
        rejected_logprobs: (B, R) per-token log-probs of the rejected sequence.
        rejected_mask: (B, R) True on the rejected response tokens (at least one per row).
        lam: weight of the odds-ratio term (lambda in the paper, ``beta`` in TRL).
        sft_mask: (B, R) tokens of the chosen sequence that the NLL trains; default ``chosen_mask``.

    Returns:
        ``(loss, metrics)``: metrics from ``preference_metrics`` with rewards = lam * mean log-prob and
        logps the mean per-token log-probs, plus ``loss/nll``, ``logps/log_odds_chosen`` (mean log odds
        ratio) and ``logps/log_odds_ratio`` (mean log sigma of it); TRL's ``nll_loss``, ``log_odds_chosen``
        and ``log_odds_ratio``.
    """
    chosen_logprobs, rejected_logprobs = upcast(chosen_logprobs, rejected_logprobs)
    chosen_mask, rejected_mask = as_bool_mask(chosen_mask), as_bool_mask(rejected_mask)
    sft_mask = chosen_mask if sft_mask is None else as_bool_mask(sft_mask)

    nll = -masked_mean(chosen_logprobs, sft_mask)
    chosen_lp = masked_mean(chosen_logprobs, chosen_mask, dim=-1)
    rejected_lp = masked_mean(rejected_logprobs, rejected_mask, dim=-1)
    log_odds = (chosen_lp - log1m_exp(chosen_lp)) - (rejected_lp - log1m_exp(rejected_lp))
    log_sigmoid = F.logsigmoid(log_odds)
    loss = nll - lam * log_sigmoid.mean()

    metrics = preference_metrics(lam * chosen_lp, lam * rejected_lp, chosen_lp, rejected_lp)
    metrics["loss/nll"] = nll.detach()
    metrics["logps/log_odds_chosen"] = log_odds.detach().mean()
    metrics["logps/log_odds_ratio"] = log_sigmoid.detach().mean()
    return loss, metrics
