"""Shared-prompt preference batches give what the ordinary (2B, T) layout gives: per-token log-probs, their
gradients, reward scores, reference log-probs (on the fly and precomputed) and whole training runs."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from data import DataConfig, make_collator, synthetic
from engine.config import LoraConfig, ModelConfig, ReferenceConfig
from engine.logprobs import label_logprobs
from engine.loops import pairwise, reward
from engine.loops.pairwise import with_row_index
from engine.models import load_policy, load_reward_model, load_tokenizer
from engine.reference import ModelReference, add_row_index, make_reference
from engine.shared_prompt import pair_scores, score_head, use_shared_prompt
from tests.engine.runs import run, series

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TINY = ModelConfig(name_or_path="tiny")
ATTENTION = ["sdpa", "eager"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY)


def _rows(tokenizer, n: int = 6, *, train_on_prompt: bool = False) -> list[dict]:
    """Synthetic pairs; every other prompt cut to a different length, so prompts differ within a batch."""
    rows = []
    for i, r in enumerate(synthetic.generate("preference", n, seed=0)):
        prompt = tokenizer(r["prompt"] + "\n").input_ids[: None if i % 2 else 6 + i]
        row = {"margin": float(i)}
        for side in ("chosen", "rejected"):
            response = tokenizer(r[side] + tokenizer.eos_token, add_special_tokens=False).input_ids
            row[f"{side}_input_ids"] = prompt + response
            row[f"{side}_labels"] = (prompt if train_on_prompt else [-100] * len(prompt)) + response
        rows.append(row)
    return rows


def _batches(tokenizer, rows, row_tokens: int = 0):
    """The ordinary and the shared layout; `row_tokens` > 0 lets short pairs share a row."""
    return (make_collator("preference", tokenizer, share_prompt=share, share_row_tokens=row_tokens)(rows)
            for share in (False, True))


ROW_TOKENS = [0, 80]  # one pair per row; rows of up to 80 tokens, which hold these 6 pairs in 3


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def _assert_same_gradients(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal to float32 rounding: the shared layout sums the prompt's two gradient contributions in another
    order, so an element near zero may differ by ~1e-6 of its tensor's largest element."""
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert float((grad - expected[name]).norm()) <= 1e-5 * float(expected[name].norm()), name


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("row_tokens", ROW_TOKENS)
def test_log_probs_and_gradients_equal_the_ordinary_layout(tokenizer, attention, train_on_prompt, row_tokens):
    """With the loss on the prompt too, every prompt position is read by both responses."""
    torch.manual_seed(0)
    model = load_policy(replace(TINY, attn_implementation=attention)).train()
    model.config.attention_dropout = 0.0
    ordinary, shared = _batches(tokenizer, _rows(tokenizer, train_on_prompt=train_on_prompt), row_tokens)
    assert shared["input_ids"].numel() < ordinary["input_ids"].numel()
    assert len(shared["input_ids"]) == (6 if row_tokens == 0 else 3)  # 6 pairs, packed into 3 rows

    expected, expected_mask, expected_logits = label_logprobs(model, ordinary, return_logits=True)
    (expected * torch.linspace(0.5, 1.5, expected.shape[-1])).sum().backward()  # weights differ per position
    expected_grads = _grads(model)
    logprobs, mask, logits = label_logprobs(model, shared, return_logits=True)
    (logprobs * torch.linspace(0.5, 1.5, logprobs.shape[-1])).sum().backward()
    grads = _grads(model)

    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)
    # per sequence: sums of up to ~150 in magnitude, so float32 rounding of the sum itself is ~1e-5
    torch.testing.assert_close(logprobs.sum(-1), expected.sum(-1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5)
    _assert_same_gradients(grads, expected_grads)


def test_a_model_that_returns_full_logits_is_handled(tokenizer):
    model = load_policy(TINY).eval()

    class FullLogits(torch.nn.Module):
        config = model.config

        def forward(self, logits_to_keep=None, **kwargs):
            return model(**kwargs)

    ordinary, shared = _batches(tokenizer, _rows(tokenizer, 3))
    with torch.no_grad():
        expected, _ = label_logprobs(model, ordinary)
        logprobs, _ = label_logprobs(FullLogits(), shared)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("row_tokens", ROW_TOKENS)
def test_reward_scores_and_gradients_equal_the_ordinary_layout(tokenizer, attention, lora, row_tokens):
    torch.manual_seed(0)
    cfg = replace(TINY, attn_implementation=attention, lora=LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.0))
    model = load_reward_model(cfg, for_training=True).train()
    assert score_head(model) is not None
    ordinary, shared = _batches(tokenizer, _rows(tokenizer), row_tokens)

    expected = model(input_ids=ordinary["input_ids"], attention_mask=ordinary["attention_mask"]).logits.squeeze(-1)
    (expected * torch.arange(1.0, len(expected) + 1)).sum().backward()
    expected_grads = _grads(model)
    chosen, rejected = pair_scores(model, shared)
    (torch.cat([chosen, rejected]) * torch.arange(1.0, len(expected) + 1)).sum().backward()
    grads = _grads(model)

    torch.testing.assert_close(torch.cat([chosen, rejected]), expected, rtol=0, atol=1e-5)
    _assert_same_gradients(grads, expected_grads)


def test_reference_log_probs_on_the_fly_and_precomputed(tokenizer, tmp_path):
    policy = load_policy(TINY)
    dataset = add_row_index(Dataset.from_list(_rows(tokenizer, 7)))
    ordinary, shared = (with_row_index(make_collator("preference", tokenizer, share_prompt=share))
                        for share in (False, True))
    reference = ModelReference(load_policy(TINY, for_training=False))
    for reduction in ("sum", "mean"):
        expected = reference.logps(ordinary(list(dataset)), reduction=reduction)
        torch.testing.assert_close(reference.logps(shared(list(dataset)), reduction=reduction), expected,
                                   rtol=0, atol=1e-5)

    caches = {}
    for name, collate in (("ordinary", ordinary), ("shared", shared)):
        ref = make_reference(ReferenceConfig(mode="precomputed", cache_dir=str(tmp_path / name)), TINY, policy)
        ref.precompute(dataset, collate, batch_size=3)
        caches[name] = ref
    batch = shared([dataset[i] for i in (5, 0, 3)])  # looked up by row_index, not by position
    for reduction in ("sum", "mean"):
        got = caches["shared"].logps(batch, reduction=reduction)
        want = caches["ordinary"].logps(batch, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        direct = reference.logps(ordinary([dataset[i] for i in (5, 0, 3)]), reduction=reduction)
        torch.testing.assert_close(got, direct, rtol=0, atol=1e-5)


def _model(attention: str, *, head: bool = True, **config):
    config = SimpleNamespace(_attn_implementation=attention, **config)
    return SimpleNamespace(config=config, score=torch.nn.Linear(2, 1) if head else None)


@pytest.mark.parametrize("data, model, scores, reason", [
    (DataConfig(), _model("sdpa"), True, None),
    (DataConfig(), _model("eager"), False, None),
    (DataConfig(share_prompt=False), _model("sdpa"), False, ""),
    (DataConfig(), _model("flash_attention_2"), False, "attention 'flash_attention_2' takes no custom mask"),
    (DataConfig(), _model("flex_attention"), False, "attention 'flex_attention' takes no custom mask"),
    (DataConfig(packing=True), _model("sdpa"), False, "data.packing=true"),
    (DataConfig(max_length=512), _model("sdpa", sliding_window=512), False, None),
    (DataConfig(max_length=512), _model("sdpa", sliding_window=256, use_sliding_window=False), False, None),
    (DataConfig(max_length=512), _model("sdpa", sliding_window=256), False, "sliding attention window (256)"),
    (DataConfig(), _model("sdpa", head=False), True, "no `score` head"),
])
def test_where_batches_keep_the_ordinary_layout(data, model, scores, reason):
    """A fallback is one log line naming why; share_prompt=false is silent."""
    lines = []
    shared = use_shared_prompt(data, model, scores=scores, log=lines.append)
    assert shared == (reason is None)
    if reason:
        assert len(lines) == 1 and reason in lines[0] and lines[0].startswith("data.share_prompt:")
    else:
        assert lines == []


def test_a_ddp_wrapped_model_is_looked_through():
    inner = _model("sdpa")
    assert use_shared_prompt(DataConfig(), SimpleNamespace(module=inner), scores=True, log=print)


RUN = ["max_steps=3", "optim.lr=1e-3", "data.max_samples=8", "batch.global_batch_size=8", "batch.micro_batch_size=4",
       "eval.every_steps=3", "eval.max_batches=1", "data.eval_fraction=0.2"]


@pytest.mark.parametrize("config, extra", [
    ("dpo.yaml", ["objective.beta=0.1"]),
    ("dpo.yaml", ["objective.beta=0.1", "reference.mode=precomputed"]),
    ("reward.yaml", []),
])
def test_training_runs_give_the_same_losses(tmp_path, monkeypatch, config, extra):
    layouts = []

    def recording_collator(*args, **kwargs):
        layouts.append(kwargs.get("share_prompt"))
        return make_collator(*args, **kwargs)

    for loop in (pairwise, reward):
        monkeypatch.setattr(loop, "make_collator", recording_collator)
    runs = {share: run(config, tmp_path / str(share), *RUN, *extra, f"reference.cache_dir={tmp_path / 'ref'}",
                       f"data.share_prompt={str(share).lower()}")
            for share in (False, True)}
    for key in ("loss", "rewards/margins", "eval/loss"):
        ordinary, shared = series(runs[False], key), series(runs[True], key)
        assert len(ordinary) == (2 if key == "eval/loss" else 3)  # eval at steps 0 and 3
        assert shared == pytest.approx(ordinary, rel=0, abs=1e-5), key
    assert layouts == [False, True]
    assert series(runs[True], "loss")[-1] != series(runs[True], "loss")[0]  # it trained
