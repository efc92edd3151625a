"""Supervised fine-tuning: the token-level negative log-likelihood of the completion."""

from __future__ import annotations

from torch import Tensor

from .masking import as_bool_mask, masked_mean, masked_sum
from .registry import register


@register("sft", family="sft")
def sft_loss(logprobs: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean negative log-likelihood over every counted token of the batch (maximum likelihood).

    Completion-only training is a matter of the mask: prompt and padding positions are False
    (``token_logprobs`` gives False wherever the label is -100). The mean is token-weighted over the
    whole batch, not a mean of per-sequence means, so long completions weigh more; split into
    micro-batches, scale each loss by its token count over the total to get the same gradient.

    Args:
        logprobs: (B, T) per-token log-probs of the labels.
        mask: (B, T) True on the tokens that are trained.

    Returns:
        ``(loss, metrics)``: scalar loss; metrics ``loss/nll`` (detached).
    """
    nll = -masked_mean(logprobs, mask)
    return nll, {"loss/nll": nll.detach()}


@register("reward_weighted_sft", family="sft", row_weights=True)
def reward_weighted_sft_loss(logprobs: Tensor, mask: Tensor, weights: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood with every row's tokens weighted by that row's weight, over the batch's tokens.

    ReST's Improve objective (Gulcehre et al. 2023, "Reinforced Self-Training (ReST) for Language Modeling")
    is the NLL of the Grow samples weighted by F(x, y; tau) = 1[R(x, y) > tau]; with the reward itself as the
    weight this is reward-weighted regression (Peters & Schaal 2007), the reward-weighted variant of that loss:

        loss = -(1 / N) * sum_i w_i * sum_t mask_it * logprobs_it,    N = sum_it mask_it

    The divisor is the token count, not the weighted token count, so weights of 1 give ``sft_loss``'s value and
    micro-batches accumulate by their share of the trained tokens, as SFT's do. Weights are meant to be >= 0:
    a negative weight pushes its row's likelihood down, without bound.

    Args:
        logprobs: (B, T) per-token log-probs of the labels.
        mask: (B, T) True on the tokens that are trained.
        weights: (B,) the weight of each row (the data's ``weight`` column).

    Returns:
        ``(loss, metrics)``: scalar loss; metrics ``loss/nll`` (the unweighted token-mean NLL, as ``sft_loss``),
        ``loss/weighted_nll`` (the loss) and ``weights/mean`` (mean over rows), detached.
    """
    row_sums = masked_sum(logprobs, mask, dim=-1)  # (B,) summed log-probs of each row's trained tokens
    tokens = as_bool_mask(mask).sum().clamp_min(1)
    loss = -(weights.to(row_sums.dtype) * row_sums).sum() / tokens
    nll = -row_sums.sum() / tokens
    return loss, {"loss/nll": nll.detach(), "loss/weighted_nll": loss.detach(),
                  "weights/mean": weights.detach().to(row_sums.dtype).mean()}
