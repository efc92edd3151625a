"""Per-token log-probs of a batch's labels under a causal LM, with the LM head applied only where a label is.

A completion-only batch trains on a fraction of its positions (the responses; prompts and padding carry
label -100), yet `model(...).logits` projects every position onto the vocabulary. transformers 5 takes a
boolean `logits_to_keep` (B, T) and applies the head to the kept hidden states only, returning (K, V)
logits for the K kept positions in row-major order. `label_logprobs` keeps position t exactly when
labels[:, t + 1] is trained, so the head's matmul, the log-softmax and their backward shrink to the
K = mask.sum() positions a loss reads: at a 32k vocabulary and responses a quarter of the batch, that is
most of the head's cost. The result has the layout of `losses.token_logprobs` ((B, T-1), zeros where the
mask is False), so everything downstream is unchanged.

A shared-prompt preference batch (data.share_prompt) is handled by `shared_label_logprobs`, which returns
the ordinary layout's (2B, T'-1) log-probs from its rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from engine.shared_prompt import is_shared, model_attention_mask
from losses import gather_logprobs, token_logprobs


def label_logprobs(
    model, batch: Mapping[str, Tensor], *, ignore_index: int = -100, return_logits: bool = False
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Log-probs of `batch["labels"]` (B, T): logits at t predict labels at t + 1 (the causal shift).

    Returns:
        logprobs (B, T-1) fp32 with 0 where the mask is False, mask (B, T-1) bool, and with
        `return_logits=True` the (K, V) logits of the K masked positions in row-major order.

    A model that ignores a boolean `logits_to_keep` (full (B, T, V) logits back), has no such argument, or
    reads it as column indices (transformers releases before boolean masks; some remote-code models) is
    handled the slow way.
    """
    if is_shared(batch):
        return shared_label_logprobs(model, batch, ignore_index=ignore_index, return_logits=return_logits)
    labels = batch["labels"]
    mask = labels[:, 1:] != ignore_index
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = mask
    logits = _logits(model, {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                              "position_ids": batch.get("position_ids"), "use_cache": False}, keep)
    if logits.dim() == 3:  # the whole sequence came back
        logprobs, mask = token_logprobs(logits, labels, ignore_index=ignore_index)
        return (logprobs, mask, logits[:, :-1][mask]) if return_logits else (logprobs, mask)
    selected = gather_logprobs(logits.unsqueeze(0), labels[:, 1:][mask].unsqueeze(0)).squeeze(0)
    logprobs = torch.zeros(mask.shape, dtype=selected.dtype, device=selected.device).masked_scatter(mask, selected)
    return (logprobs, mask, logits) if return_logits else (logprobs, mask)


def shared_label_logprobs(
    model, batch: Mapping[str, Tensor], *, ignore_index: int = -100, return_logits: bool = False
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """`label_logprobs` of a shared-prompt batch (data.collators.share_prompt_batch): what the ordinary layout
    of the same pairs gives, (2B, T'-1) chosen rows then rejected rows, from one forward over its rows.

    Token t of ordinary row r sits at position token_positions[r, t] of shared row token_rows[r], and the
    logits there predict labels[r, t + 1]. The head runs once at each of the K shared positions some label
    needs; the last prompt position predicts both responses' first tokens, so its logits are read twice (as are
    the prompt's when the loss is on the prompt). With `return_logits=True`, the (N, V) logits of the N
    masked positions in the ordinary row-major order (rows read twice are copied).
    """
    labels = batch["labels"]  # (2B, T')
    mask = labels[:, 1:] != ignore_index
    n_rows, width = batch["input_ids"].shape
    rows = batch["token_rows"]
    # (N,) for each label, where its logits are in the flattened (R * T) shared batch
    flat = (rows[:, None] * width + batch["token_positions"][:, :-1])[mask]
    keep = torch.zeros(n_rows * width, dtype=torch.bool, device=labels.device)
    keep[flat] = True
    logits = _logits(model, {"input_ids": batch["input_ids"], "attention_mask": model_attention_mask(model, batch),
                              "position_ids": batch["position_ids"], "use_cache": False}, keep.view(n_rows, width))
    if logits.dim() == 3:  # the whole sequence came back
        logits = logits.flatten(0, 1)[keep]
    slot = (keep.cumsum(0) - 1)[flat]  # (N,) each label's row of the (K, V) logits
    targets = labels[:, 1:][mask]
    # Each of the K rows is scored against the first label that reads it, in place (no copy of the logits);
    # the few rows read again are copied and scored against their second label.
    uses = torch.arange(len(flat), device=labels.device)
    first = torch.full((len(logits),), len(flat), device=labels.device).scatter_reduce(0, slot, uses, "amin")
    again = torch.ones(len(flat), dtype=torch.bool, device=labels.device).index_fill(0, first, False)
    selected = gather_logprobs(logits.unsqueeze(0), targets[first].unsqueeze(0)).squeeze(0)[slot]
    repeated = gather_logprobs(logits[slot[again]].unsqueeze(0), targets[again].unsqueeze(0)).squeeze(0)
    selected = selected.masked_scatter(again, repeated)
    logprobs = torch.zeros(mask.shape, dtype=selected.dtype, device=selected.device)
    logprobs = logprobs.masked_scatter(mask, selected)
    return (logprobs, mask, logits[slot]) if return_logits else (logprobs, mask)


def _logits(model, inputs: dict, keep: Tensor) -> Tensor:
    """(K, V) logits at the kept positions, or (B, T, V) from a model that cannot keep a boolean selection."""
    try:
        return model(**inputs, logits_to_keep=keep).logits
    except (TypeError, IndexError):  # no `logits_to_keep`, or one that indexes (B, T) booleans as columns
        return model(**inputs).logits
