"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest

from engine import loaders, models


@pytest.fixture
def no_model_load(monkeypatch):
    """Any run that loads a policy or reward model, or gets as far as an optimizer step, fails the test: what
    a start-up check must refuse is refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_policy", refuse)
    monkeypatch.setattr(models, "load_reward_model", refuse)
    monkeypatch.setattr(loaders, "optimizer_steps", refuse)
