"""Per-token log-probs and entropies from logits, chunked, with and without the causal shift."""

import pytest
import torch

from losses import entropy_from_logits, gather_logprobs, token_logprobs

F64 = torch.float64


def test_token_logprobs_by_hand():
    """V = 2 with logits (0, log 3): p = (1/4, 3/4) at every position, so log p(1) = log 3/4.

    labels (7, 1, 0, -100): position t scores labels[t + 1], so the result is
    (log 3/4 for label 1, log 1/4 for label 0, 0 for the ignored label) with mask (T, T, F).
    """
    logits = torch.tensor([0.0, torch.log(torch.tensor(3.0, dtype=F64)).item()], dtype=F64).expand(1, 4, 2)
    labels = torch.tensor([[7, 1, 0, -100]])
    logprobs, mask = token_logprobs(logits, labels)
    expected = torch.log(torch.tensor([[0.75, 0.25, 1.0]], dtype=F64))
    torch.testing.assert_close(logprobs, expected, rtol=1e-15, atol=1e-15)
    assert mask.tolist() == [[True, True, False]]
    assert logprobs.shape == (1, 3) and mask.dtype == torch.bool


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 1000])
def test_gather_matches_log_softmax_for_any_chunking(chunk_size):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen, dtype=F64) * 4
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    got = gather_logprobs(logits, labels, chunk_size=chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_token_logprobs_shift_and_ignore_index_match_reference():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 9, generator=gen, dtype=F64)
    labels = torch.randint(0, 9, (3, 6), generator=gen)
    labels[0, :3] = -100
    labels[2, 4:] = -100
    logprobs, mask = token_logprobs(logits, labels, chunk_size=4)
    for b in range(3):
        for t in range(5):
            target = labels[b, t + 1].item()
            if target == -100:
                assert not mask[b, t] and logprobs[b, t].item() == 0.0
            else:
                assert mask[b, t]
                want = torch.log_softmax(logits[b, t], -1)[target]
                assert logprobs[b, t].item() == pytest.approx(want.item(), rel=1e-12)


def test_gradcheck_gather_token_logprobs_and_entropy():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 5, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 4), generator=gen)
    assert torch.autograd.gradcheck(lambda x: gather_logprobs(x, labels, chunk_size=3), (logits,))
    labels[1, 2] = -100
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels, chunk_size=3)[0], (logits,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, chunk_size=3), (logits,))


def test_entropy_by_hand_and_against_reference():
    """Uniform over 4 gives log 4; (0, log 3) gives -(1/4 log 1/4 + 3/4 log 3/4)."""
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 1.0986122886681098, -1e9, -1e9]]], dtype=F64)
    want = torch.tensor([[torch.log(torch.tensor(4.0, dtype=F64)).item(), 0.5623351446188083]], dtype=F64)
    torch.testing.assert_close(entropy_from_logits(logits), want, rtol=1e-12, atol=0)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=F64) * 3
    probs = torch.softmax(logits, -1)
    reference = -(probs * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=2), reference, rtol=1e-12, atol=1e-14)


def test_entropy_with_banned_tokens():
    """-inf logits carry probability 0 and add 0 log 0 = 0: (0, log 3, -inf) has the entropy of (1/4, 3/4)."""
    logits = torch.tensor([[[0.0, 1.0986122886681098, -torch.inf]]], dtype=F64, requires_grad=True)
    entropy = entropy_from_logits(logits)
    assert entropy.item() == pytest.approx(0.5623351446188083, rel=1e-12)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, 2] == 0


def test_bf16_logits_are_scored_in_fp32():
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 5, 13, generator=gen) * 5).to(torch.bfloat16)
    labels = torch.randint(0, 13, (2, 5), generator=gen)
    got, _ = token_logprobs(logits, labels)
    assert got.dtype == torch.float32
    want = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert entropy_from_logits(logits).dtype == torch.float32


def _saved_full_fp32_copies(fn, logits):
    """Tensors the autograd graph keeps that are float32 and as large as the whole (B, T, V) logits."""
    big = []

    def pack(t):
        if t.dtype == torch.float32 and t.numel() >= logits.numel():
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(logits)
    return out, big


def test_no_full_fp32_copy_of_bf16_logits_is_kept_for_backward():
    """Only the bf16 input is saved; a naive log_softmax(logits.float()) keeps a (B, T, V) fp32 copy."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 32, generator=gen).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 32, (2, 6), generator=gen)

    def naive(x):
        return torch.log_softmax(x.float(), -1)[:, :-1].gather(-1, labels[:, 1:, None])

    _, naive_saved = _saved_full_fp32_copies(naive, logits)
    assert naive_saved, "the probe must see the copy a naive implementation keeps"

    out, saved = _saved_full_fp32_copies(lambda x: token_logprobs(x, labels, chunk_size=4)[0], logits)
    assert saved == []
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()
    _, saved = _saved_full_fp32_copies(lambda x: entropy_from_logits(x, chunk_size=4), logits)
    assert saved == []


def test_gradient_of_token_logprobs_matches_autograd_reference():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, 1] = -100
    weights = torch.randn(2, 4, generator=gen, dtype=F64)
    (token_logprobs(logits, labels, chunk_size=3)[0] * weights).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    mask = labels[:, 1:] != -100
    safe = torch.where(mask, labels[:, 1:], 0)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, safe[..., None]).squeeze(-1)
    (torch.where(mask, ref, 0) * weights).sum().backward()
    torch.testing.assert_close(got, logits.grad, rtol=1e-12, atol=1e-14)
    assert torch.all(got[:, -1] == 0)
