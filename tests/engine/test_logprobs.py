"""`label_logprobs` (LM head only at labelled positions) equals the full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch

from data import make_collator, synthetic
from engine.config import ModelConfig
from engine.logprobs import label_logprobs
from engine.models import load_policy, load_tokenizer
from losses import token_logprobs

TINY = ModelConfig(name_or_path="tiny")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def _rows(tokenizer, n: int) -> list[dict]:
    rows = []
    for r in synthetic.generate("sft", n, seed=3):
        prompt = tokenizer(r["prompt"] + "\n").input_ids
        response = tokenizer(r["completion"] + tokenizer.eos_token, add_special_tokens=False).input_ids
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


@pytest.mark.parametrize("packing", [False, True])
def test_equal_to_full_logits_values_and_gradients(tokenizer, packing):
    torch.manual_seed(0)
    model = load_policy(TINY).train()
    batch = make_collator("sft", tokenizer, packing=packing)(_rows(tokenizer, 5))

    full_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], use_cache=False).logits
    expected, expected_mask = token_logprobs(full_logits, batch["labels"])
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logprobs, mask, logits = label_logprobs(model, batch, return_logits=True)
    logprobs.sum().backward()

    assert torch.equal(mask, expected_mask)
    assert logits.shape == (int(mask.sum()), full_logits.shape[-1])  # the head ran at the K labelled positions
    torch.testing.assert_close(logits, full_logits[:, :-1][mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)
    assert (logprobs[~mask] == 0).all()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_labelled_position_gives_an_empty_selection(tokenizer):
    model = load_policy(TINY).eval()
    batch = make_collator("sft", tokenizer)(_rows(tokenizer, 2))
    batch["labels"][:] = -100
    logprobs, mask, logits = label_logprobs(model, batch, return_logits=True)
    assert logits.shape[0] == 0 and not mask.any() and (logprobs == 0).all()


@pytest.mark.parametrize("error", [TypeError, IndexError])
def test_a_model_that_cannot_take_a_boolean_selection_is_called_without_it(tokenizer, error):
    """No `logits_to_keep` argument (TypeError), or one that indexes (B, T) booleans as columns (IndexError)."""
    model = load_policy(TINY).eval()
    calls = []

    class Old(torch.nn.Module):
        def forward(self, **kwargs):
            calls.append(sorted(kwargs))
            if "logits_to_keep" in kwargs:
                raise error("logits_to_keep")
            return model(**kwargs)

    batch = make_collator("sft", tokenizer)(_rows(tokenizer, 3))
    with torch.no_grad():
        expected = label_logprobs(model, batch)
        got = label_logprobs(Old(), batch)
    assert ["logits_to_keep" in c for c in calls] == [True, False]
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_model_that_returns_full_logits_is_handled(tokenizer):
    """A model that ignores the boolean `logits_to_keep` still gives the right log-probs and (K, V) logits."""
    model = load_policy(TINY).eval()

    class FullLogits(torch.nn.Module):
        def forward(self, logits_to_keep=None, **kwargs):
            return model(**kwargs)

    batch = make_collator("sft", tokenizer)(_rows(tokenizer, 3))
    with torch.no_grad():
        fast = label_logprobs(model, batch, return_logits=True)
        slow = label_logprobs(FullLogits(), batch, return_logits=True)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
