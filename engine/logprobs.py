"""Per-token log-probs of a batch's labels under a causal LM, with the LM head applied only where a label is.

A completion-only batch trains on a fraction of its positions (the responses; prompts and padding carry
label -100), yet `model(...).logits` projects every position onto the vocabulary. transformers 5 takes a
boolean `logits_to_keep` (B, T) and applies the head to the kept hidden states only, returning (K, V)
logits for the K kept positions in row-major order. `label_logprobs` keeps position t exactly when
labels[:, t + 1] is trained, so the head's matmul, the log-softmax and their backward shrink to the
K = mask.sum() positions a loss reads: at a 32k vocabulary and responses a quarter of the batch, that is
most of the head's cost. The result has the layout of `losses.token_logprobs` ((B, T-1), zeros where the
mask is False), so everything downstream is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from losses import gather_logprobs, token_logprobs


def label_logprobs(
    model, batch: Mapping[str, Tensor], *, ignore_index: int = -100, return_logits: bool = False
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Log-probs of `batch["labels"]` (B, T): logits at t predict labels at t + 1 (the causal shift).

    Returns:
        logprobs (B, T-1) fp32 with 0 where the mask is False, mask (B, T-1) bool, and with
        `return_logits=True` the (K, V) logits of the K masked positions in row-major order.

    A model that ignores a boolean `logits_to_keep` (full (B, T, V) logits back) is handled the slow way.
    """
    labels = batch["labels"]
    mask = labels[:, 1:] != ignore_index
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = mask
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        logits_to_keep=keep,
    ).logits
    if logits.dim() == 3:  # the whole sequence came back
        logprobs, mask = token_logprobs(logits, labels, ignore_index=ignore_index)
        return (logprobs, mask, logits[:, :-1][mask]) if return_logits else (logprobs, mask)
    selected = gather_logprobs(logits.unsqueeze(0), labels[:, 1:][mask].unsqueeze(0)).squeeze(0)
    logprobs = torch.zeros(mask.shape, dtype=selected.dtype, device=selected.device).masked_scatter(mask, selected)
    return (logprobs, mask, logits) if return_logits else (logprobs, mask)
