"""Per-token log-probabilities and entropies from logits, one chunk of rows at a time, and their reductions
to one log-prob per sequence.

A causal LM's logits are (B, T, V); with a large vocabulary a float32 copy of them is the largest
tensor of a training step. These functions upcast one chunk of rows at a time (logsumexp in fp32)
and, in backward, recompute the softmax of each chunk from the saved input logits, so no second
full (B, T, V) float32 tensor is ever alive: only the input and, in backward, its gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .masking import compute_dtype, masked_sum
from .registry import LOGPS_REDUCTIONS

CHUNK_ELEMENTS = 1 << 24
"""Logits elements upcast at once by default (64 MiB in fp32)."""


def _rows_per_chunk(vocab_size: int, chunk_size: int | None) -> int:
    return chunk_size if chunk_size is not None else max(1, CHUNK_ELEMENTS // vocab_size)


class _GatherLogprobs(torch.autograd.Function):
    """log softmax(logits)[label] for (N, V) logits and (N,) labels; grad = g * (onehot - softmax)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, rows: int) -> Tensor:
        dtype = compute_dtype(logits)
        out = torch.empty(labels.shape, dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start : start + rows].to(dtype)
            lse[start : start + rows] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, labels[start : start + rows, None]).squeeze(-1)
            out[start : start + rows] = picked - lse[start : start + rows]
        ctx.save_for_backward(logits, labels, lse)
        ctx.rows = rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            rows = slice(start, start + ctx.rows)
            g = grad_out[rows, None].to(lse.dtype)
            chunk_grad = -torch.exp(logits[rows].to(lse.dtype) - lse[rows, None]) * g
            chunk_grad.scatter_add_(-1, labels[rows, None], g)
            grad[rows] = chunk_grad
        return grad, None, None


def _p_log_p(log_probs: Tensor) -> Tensor:
    """p log p with 0 log 0 = 0, so logits of -inf (banned tokens) contribute nothing instead of NaN."""
    return torch.where(log_probs > -torch.inf, torch.exp(log_probs) * log_probs, 0)


class _Entropy(torch.autograd.Function):
    """H = logsumexp(x) - sum(p * x) per row of (N, V) logits; dH/dx = -p * (log p + H)."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: int) -> Tensor:
        dtype = compute_dtype(logits)
        entropy = torch.empty(logits.shape[:-1], dtype=dtype, device=logits.device)
        lse = torch.empty_like(entropy)
        for start in range(0, logits.shape[0], rows):
            chunk = logits[start : start + rows].to(dtype)
            chunk_lse = torch.logsumexp(chunk, dim=-1)
            lse[start : start + rows] = chunk_lse
            entropy[start : start + rows] = -_p_log_p(chunk - chunk_lse[:, None]).sum(-1)
        ctx.save_for_backward(logits, lse, entropy)
        ctx.rows = rows
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            rows = slice(start, start + ctx.rows)
            log_probs = logits[rows].to(lse.dtype) - lse[rows, None]
            chunk_grad = -_p_log_p(log_probs) - torch.exp(log_probs) * entropy[rows, None]
            grad[rows] = chunk_grad * grad_out[rows, None].to(lse.dtype)
        return grad, None


def gather_logprobs(logits: Tensor, labels: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Log-probability of each label under the softmax of its own row of logits (no shift).

    Args:
        logits: (B, T, V) in any float dtype; never copied to fp32 as a whole.
        labels: (B, T) valid token ids (no ignore index), aligned with ``logits``.
        chunk_size: rows of ``logits`` upcast at once (default: CHUNK_ELEMENTS // V).

    Returns:
        (B, T) log pi(labels | logits) in fp32 (float64 for float64 logits); differentiable.
    """
    vocab_size = logits.shape[-1]
    flat = logits.reshape(-1, vocab_size)
    rows = _rows_per_chunk(vocab_size, chunk_size)
    return _GatherLogprobs.apply(flat, labels.reshape(-1).long(), rows).view(labels.shape)


def token_logprobs(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of a causal LM: logits[:, t] predicts labels[:, t + 1].

    Args:
        logits: (B, T, V) model outputs for the full sequence.
        labels: (B, T) token ids, ``ignore_index`` where a position is not trained (prompt, padding).
        ignore_index: label value that marks a position as not counting.
        chunk_size: see ``gather_logprobs``.

    Returns:
        ``(logprobs, mask)``, each (B, T - 1): logprobs[:, t] = log pi(labels[:, t + 1] | prefix),
        0 where the label is ``ignore_index``; mask bool, False there.
    """
    targets = labels[:, 1:]
    mask = targets != ignore_index
    safe = torch.where(mask, targets, 0)
    # Score every position against a dummy label for the last one, so that ``logits`` is used in
    # place (a view) instead of being copied by a [:, :-1] slice; the extra column is dropped.
    aligned = torch.cat([safe, safe.new_zeros(safe.shape[0], 1)], dim=1)
    logprobs = gather_logprobs(logits, aligned, chunk_size=chunk_size)[:, :-1]
    return torch.where(mask, logprobs, 0), mask


def entropy_from_logits(logits: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Entropy of the softmax of each row of logits, for the PPO entropy bonus (Schulman et al. 2017, Eq. 9).

    Args:
        logits: (B, T, V) in any float dtype, -inf allowed for banned tokens; processed one chunk of
            rows at a time.
        chunk_size: see ``gather_logprobs``.

    Returns:
        (B, T) entropy in nats, fp32 (float64 for float64 logits); differentiable.
    """
    vocab_size = logits.shape[-1]
    flat = logits.reshape(-1, vocab_size)
    rows = _rows_per_chunk(vocab_size, chunk_size)
    return _Entropy.apply(flat, rows).view(logits.shape[:-1])


def sequence_sums(logprobs: Tensor, mask: Tensor, seq_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of masked per-token log-probs and the counts of their tokens.

    Args:
        logprobs, mask: (N, T-1) from ``token_logprobs``, or (1, L-1) for a packed batch.
        seq_lens: (S,) lengths of the packed sequences (the packing collator's ``seq_lens``), or None.

    Returns:
        ``(sums, counts)``, each (N,), or (S,) for a packed batch; sums in fp32.
    """
    if seq_lens is None:
        return masked_sum(logprobs, mask, dim=-1), mask.sum(-1)
    # logprobs[0, t] scores token t + 1, so it belongs to the sequence holding token t + 1; the packing
    # collator masks the first token of every sequence, so nothing crosses a boundary.
    segment = torch.repeat_interleave(torch.arange(len(seq_lens), device=seq_lens.device), seq_lens)[1:]
    n = min(len(segment), logprobs.shape[-1])
    values = torch.where(mask[0, :n], logprobs[0, :n].float(), 0)
    sums = values.new_zeros(len(seq_lens)).index_add_(0, segment[:n], values)
    counts = seq_lens.new_zeros(len(seq_lens)).index_add_(0, segment[:n], mask[0, :n].long())
    return sums, counts


def reduce_logprobs(logprobs: Tensor, mask: Tensor, reduction: str = "sum", *, seq_lens: Tensor | None = None) -> Tensor:
    """Per-token log-probs -> per-sequence (N,) (or (S,) packed): their sum, or their mean over the masked
    tokens (``reduction`` one of ``LOGPS_REDUCTIONS``)."""
    if reduction not in LOGPS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {LOGPS_REDUCTIONS}, got {reduction!r}")
    total, count = sequence_sums(logprobs, mask, seq_lens)
    return total if reduction == "sum" else total / count.clamp(min=1)


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """(2B, ...) rows [chosen..., rejected...] -> (chosen (B, ...), rejected (B, ...))."""
    if values.shape[0] % 2:
        raise ValueError(f"a preference batch has an even number of rows (chosen, then rejected), got {values.shape[0]}")
    return values.chunk(2)
