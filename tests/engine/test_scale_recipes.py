"""configs/recipes/: each loads, binds its objective, and the memory estimate in its header is the one
engine/memory.py computes from the model's config (built here from the published shapes, offline), and fits a
24 GB GPU (22.35 GiB)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoConfig

from engine import memory
from engine.config import load_config
from losses import bind_objective

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "recipes").glob("*.yaml"))
LLAMA3 = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
CONFIGS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ("llama", LLAMA3),
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": ("llama", LLAMA3),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral", {**LLAMA3, "vocab_size": 32768}),
}


def test_a_recipe_per_model_and_objective():
    assert [p.stem for p in RECIPES] == [f"{m}_qlora_{o}" for m in ("llama3_8b", "mistral_7b")
                                         for o in ("dpo", "orpo", "ppo")]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_holds_its_estimate(path, monkeypatch):
    monkeypatch.setattr(memory, "load_model_config",
                        lambda name, **kwargs: AutoConfig.for_model(CONFIGS[name][0], **CONFIGS[name][1]))
    cfg = load_config(path)
    objective, _ = bind_objective(cfg.objective.name, dict(cfg.objective.kwargs))
    assert cfg.model.quant.bits == 4 and cfg.model.lora.enabled and cfg.model.gradient_checkpointing
    text = path.read_text()
    assert f"--config configs/recipes/{path.name}" in text
    estimate = memory.estimate_memory(cfg, objective.family, needs_reference=objective.needs_reference)
    header = float(re.search(r"^# total\s+([\d.]+) GiB$", text, re.M).group(1))
    assert header == pytest.approx(memory.gib(estimate.total), abs=0.005)
    assert estimate.total < 24e9
