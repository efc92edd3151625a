"""Supervised fine-tuning: the token-level negative log-likelihood of the completion."""

from __future__ import annotations

from torch import Tensor

from .masking import masked_mean
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
