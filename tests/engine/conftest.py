"""Fixtures shared by the engine tests."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data import DataConfig, build_datasets, make_collator
from engine import loaders, models
from engine.tiny import resolve_model_path


@pytest.fixture
def no_model_load(monkeypatch):
    """Any run that loads a policy or reward model, or gets as far as an optimizer step, fails the test: what
    a start-up check must refuse is refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_policy", refuse)
    monkeypatch.setattr(models, "load_reward_model", refuse)
    monkeypatch.setattr(loaders, "optimizer_steps", refuse)


def warmup_cosine(steps: int, warmup: int = 10):
    """A LambdaLR factor: linear warm-up over `warmup` steps, then cosine to 0 at `steps`."""
    return lambda s: (s + 1) / (warmup + 1) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))


def train_plainly(model, rows, collate, *, steps: int, lr: float, loss) -> None:
    """`steps` AdamW steps at `lr` (warm-up, then cosine) on batches of 16 rows drawn with seed 0; `loss(batch)`
    is the scalar to minimise. The fixtures' models train with this loop, not the engine's."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss(collate([rows[i] for i in torch.randint(len(rows), (16,), generator=generator).tolist()])).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()


@pytest.fixture(scope="session")
def sft_policy(tmp_path_factory) -> Path:
    """The tiny model after 150 steps of plain SFT on the sorting task: it answers in the right format with
    some letters out of place, so the judge has room to go up (a random model never earns any credit)."""
    out = tmp_path_factory.mktemp("sft")
    path = resolve_model_path("tiny")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    rows = build_datasets("sft", DataConfig(path="synthetic"), tokenizer, log=None).train
    collate = make_collator("sft", tokenizer)
    train_plainly(model, rows, collate, steps=150, lr=2e-3,
                  loss=lambda batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           labels=batch["labels"]).loss)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
