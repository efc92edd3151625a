"""The tiny model builds from its config file, loads with plain transformers, and resolves from "tiny"."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import data.tiny_tokenizer
import engine.tiny
from engine.tiny import build_tiny_model, resolve_model_path


@pytest.fixture(scope="module")
def tiny_path() -> Path:
    return Path(resolve_model_path("tiny"))


@pytest.fixture
def fast_tokenizer(monkeypatch):
    """Reuse one trained tokenizer instead of training a new one for every build in this file."""
    tokenizer = data.tiny_tokenizer.build_tokenizer()
    monkeypatch.setattr(data.tiny_tokenizer, "build_tokenizer", lambda *a, **k: tokenizer)
    return tokenizer


def test_tiny_loads_with_plain_transformers(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (tiny_path / "model.safetensors").exists()
    assert not list(tiny_path.glob("*.bin"))
    assert 1e6 < model.num_parameters() < 1e7
    ids = tokenizer("Sort the letters: c a b", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_build_is_seeded(tiny_path, tmp_path, fast_tokenizer):
    """Seed 0 rebuilt elsewhere has the cached build's weights to the bit; another seed differs."""
    cached = load_file(tiny_path / "model.safetensors")
    again = load_file(build_tiny_model(tmp_path / "a", seed=0) / "model.safetensors")
    other = load_file(build_tiny_model(tmp_path / "b", seed=1) / "model.safetensors")
    assert cached.keys() == again.keys() == other.keys()
    assert all(torch.equal(cached[k], again[k]) for k in cached)
    assert not torch.equal(cached["model.layers.0.self_attn.q_proj.weight"], other["model.layers.0.self_attn.q_proj.weight"])


def test_reward_build_is_a_one_output_classifier():
    path = resolve_model_path("tiny-reward")
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert "score.weight" in load_file(Path(path) / "model.safetensors")


def test_build_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_model(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        build_tiny_model(tmp_path / "new", kind="value")


def test_resolve_caches_one_build(tiny_path):
    stamp = (tiny_path / "model.safetensors").stat().st_mtime_ns
    assert Path(resolve_model_path("tiny")) == tiny_path
    assert Path(resolve_model_path(engine.tiny.TINY_CONFIG)) == tiny_path
    assert (tiny_path / "model.safetensors").stat().st_mtime_ns == stamp


def test_resolve_passes_hub_ids_and_local_paths_through(tiny_path, tmp_path):
    assert resolve_model_path("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert resolve_model_path("gpt2") == "gpt2"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path(str(tiny_path)) == str(tiny_path)


@pytest.mark.parametrize("missing", ["./checkpoints/sft/final", "/no/such/model", "~/no-such-dir/model/x", "tests/nope"])
def test_resolve_rejects_missing_local_paths(missing):
    with pytest.raises(FileNotFoundError, match="model.name_or_path"):
        resolve_model_path(missing)


def test_racing_builds_leave_one_complete_model(tmp_path, monkeypatch, fast_tokenizer):
    """Two processes building the same cached model: both get the same complete directory, and the loser's
    temporary build is removed. The race is forced by holding both builds just before their final rename."""
    monkeypatch.setenv("RLHF_ENGINE_CACHE", str(tmp_path))
    barrier, real_replace = threading.Barrier(2, timeout=60), os.replace

    def replace(src, dst):
        if Path(dst).parent == tmp_path / "tiny":
            barrier.wait()
        return real_replace(src, dst)

    monkeypatch.setattr(engine.tiny.os, "replace", replace)
    results, errors = [], []

    def resolve():
        try:
            results.append(resolve_model_path("tiny"))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 2 and results[0] == results[1]
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [Path(results[0]).name]
    AutoModelForCausalLM.from_pretrained(results[0])


def test_a_config_vocab_size_pads_the_vocabulary_past_the_tokenizer(tmp_path, fast_tokenizer):
    spec = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2}
    (tmp_path / "big.json").write_text(json.dumps(spec | {"vocab_size": 1000}))
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "big", config_path=tmp_path / "big.json"))
    tokenizer_size = len(fast_tokenizer)
    assert model.config.vocab_size == 1000 > tokenizer_size  # the tokenizer's ids are the first 652 of 1000
    (tmp_path / "small.json").write_text(json.dumps(spec | {"vocab_size": tokenizer_size - 1}))
    with pytest.raises(ValueError, match="smaller than the tokenizer's"):
        build_tiny_model(tmp_path / "small", config_path=tmp_path / "small.json")
