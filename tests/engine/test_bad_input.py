"""Bad input fails before any training, with a message that names what to change."""

from __future__ import annotations

import shutil

import pytest

from engine import loaders, models
from engine.config import ConfigError
from engine.tiny import resolve_model_path
from tests.engine.runs import run


@pytest.fixture
def no_training(monkeypatch):
    """Any run that gets as far as an optimizer step fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(loaders, "optimizer_steps", refuse)


@pytest.fixture
def no_model_load(monkeypatch, no_training):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_policy", refuse)
    monkeypatch.setattr(models, "load_reward_model", refuse)
    monkeypatch.setattr(models, "load_tokenizer", refuse)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1e-4", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("optimm.lr=1e-4", "did you mean 'optim'?"),
        ("optim.lr=fast", "optim.lr must be float, got 'fast'"),
        ("optim.scheduler=cosin", "did you mean 'cosine'?"),
        ("objective.lamda=0.5", "no keyword argument 'lamda' (did you mean 'lam'?)"),
        ("objective.name=orpoo", "unknown objective 'orpoo' (did you mean 'orpo'?)"),
        ("batch.global_batch_size=12", "batch.global_batch_size=12 is not a multiple of batch.micro_batch_size=8"),
        ("data.path=missing/rows.jsonl", "data.path='missing/rows.jsonl' does not exist"),
        ("model.name_or_path=./no/such/model", "model.name_or_path='./no/such/model' is not an existing local path"),
        ("checkpoint.resume_from=nowhere/step_3", "checkpoint.resume_from='nowhere/step_3' is not a checkpoint"),
        ("data.packing=true", "data.packing=true applies to SFT only"),
    ],
)
def test_config_mistakes_fail_before_a_model_loads(tmp_path, no_model_load, override, message):
    with pytest.raises(ConfigError) as error:
        run("orpo.yaml", tmp_path, override)
    assert message in str(error.value)


def test_the_adapter_disabled_reference_needs_an_adapter(tmp_path, no_model_load):
    with pytest.raises(ConfigError, match="reference.mode=disabled .* set model.lora.enabled=true"):
        run("dpo.yaml", tmp_path, "reference.mode=disabled")


def test_an_unwritable_output_dir_is_named(tmp_path, no_model_load):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="output_dir=.*a_file/run' cannot be written.*choose another output_dir"):
        run("sft.yaml", tmp_path / "a_file" / "run")


def test_a_reward_model_without_a_pad_token_is_refused(tmp_path, no_training):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "no_pad"
    shutil.copytree(resolve_model_path("tiny"), model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)

    with pytest.raises(ConfigError, match="reward model model.name_or_path=.* has no pad token.*add_special_tokens"):
        run("reward.yaml", tmp_path / "run", f"model.name_or_path={model_dir}")
