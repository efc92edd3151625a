"""Settings that would train wrong with exit 0 stop at start-up instead: exit 2, a message that names the key
and the value found, no traceback, and no model weights loaded."""

from __future__ import annotations

import pytest

from engine import models
from tests.engine.runs import run_cli


def refused(config: str, tmp_path, *overrides: str) -> str:
    code, stderr = run_cli(config, tmp_path / "run", *overrides)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    return stderr


@pytest.mark.parametrize("config, override, message", [
    ("sft.yaml", "optim.max_grad_norm=-1", "optim.max_grad_norm must be 0 (no clipping) or more, got -1"),
    ("sft.yaml", "optim.warmup_steps=-2", "optim.warmup_steps must be 0 (no warmup steps) or more, got -2"),
    ("sft.yaml", "eval.every_steps=-1", "eval.every_steps must be 0 (no evaluation) or more, got -1"),
    ("sft.yaml", "checkpoint.every_steps=-5", "checkpoint.every_steps must be 0 (no step checkpoints) or more"),
    ("sft.yaml", "optim.lr=-1.0e-4", "optim.lr must be 0 (no updates) or more"),
    ("ppo.yaml", "ppo.top_k=-1", "ppo.top_k must be 0 (no top-k filter) or more, got -1"),
    ("ppo.yaml", "ppo.gamma=1.5", "ppo.gamma must be in [0, 1], got 1.5"),
    ("ppo.yaml", "ppo.kl_coef=-0.05", "ppo.kl_coef must be 0 (off) or more, got -0.05"),
    ("ppo.yaml", "ppo.value_clip=0", "ppo.value_clip must be positive, got 0.0"),
    ("sft.yaml", "model.lora.enabled=true model.lora.r=0", "model.lora.r must be positive, got 0"),
    ("sft.yaml", "model.lora.enabled=true model.lora.target_modules=[]", "model.lora.target_modules is an empty list"),
    ("dpo.yaml", "objective.beta=-1", "objective 'dpo': beta must be a number > 0, got -1"),
    ("dpo.yaml", "objective.beta=0", "objective 'dpo': beta must be a number > 0, got 0"),
    ("dpo.yaml", "objective.name=ipo objective.beta=0", "objective 'ipo': beta must be a number > 0"),
    ("dpo.yaml", "objective.name=hinge objective.beta=-0.1", "objective 'hinge': beta must be a number > 0"),
    ("dpo.yaml", "objective.label_smoothing=0.5", "label_smoothing must be a number >= 0 and < 0.5, got 0.5"),
    ("dpo.yaml", "objective.name=cdpo objective.beta=0.1 objective.label_smoothing=-0.1", "objective 'cdpo': "
                                                                                          "label_smoothing must"),
    ("dpo.yaml", "objective.beta=1e-1", "got '1e-1' (str)"),
    ("orpo.yaml", "objective.lam=-0.5", "objective 'orpo': lam must be a number >= 0, got -0.5"),
    ("ppo.yaml", "objective.clip_coef=0", "objective 'ppo': clip_coef must be a number > 0, got 0"),
    ("reward.yaml", "objective.center_coef=-1", "objective 'reward': center_coef must be a number >= 0"),
])
def test_a_setting_that_would_train_wrong_is_refused(tmp_path, no_model_load, config, override, message):
    assert message in refused(config, tmp_path, *override.split())


@pytest.mark.parametrize("text, where", [
    ("optim:\n  lr: 1.0e-4\n bad: x\n", "line 3, column 2"),  # the indentation of `bad`
    ("optim:\n  lr: [1.0e-4\nseed: 1\n", "line 3, column 5"),  # an unclosed list
    ("data:\n  prompt_format: Q: {prompt}\n", "line 2, column 19"),  # an unquoted ': '
    ("model:\n\tname_or_path: tiny\n", "line 2, column 1"),  # a tab
])
def test_a_yaml_syntax_error_in_a_config_file_names_the_file_line_and_column(tmp_path, no_model_load, text, where):
    broken = tmp_path / "broken.yaml"
    broken.write_text(text)
    assert f"{broken}, {where}: YAML syntax error" in refused(str(broken), tmp_path)


def test_a_yaml_syntax_error_in_an_override_names_the_override(tmp_path, no_model_load):
    stderr = refused("sft.yaml", tmp_path, "optim.betas=[0.9, 0.99")
    assert "override 'optim.betas=[0.9, 0.99', line 1, column" in stderr and "YAML syntax error" in stderr


@pytest.mark.parametrize("config, targets, message", [
    ("sft.yaml", "[q_projj]", "model.lora.target_modules=('q_projj',) matches no module of 'tiny'"),
    ("reward.yaml", "'.*\\.attn\\..*'", "matches no module"),
    ("sft.yaml", "[self_attn]", "matches 'model.layers.0.self_attn', a LlamaAttention, which LoRA cannot wrap"),
])
def test_lora_targets_that_match_nothing_are_refused_before_the_weights_load(tmp_path, no_model_load, config,
                                                                              targets, message):
    stderr = refused(config, tmp_path, "model.lora.enabled=true", f"model.lora.target_modules={targets}")
    assert message in stderr and "q_proj" in stderr  # and the names that would match


def test_lora_targets_are_matched_as_peft_matches_them():
    """all-linear (GPT-2's Conv1D layers count, the head does not), a list of suffixes, a regex string; the
    names equal those peft adapts on the real model."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.config import LoraConfig, ModelConfig

    gpt2 = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    for targets in ("all-linear", ("c_attn",), r".*\.h\.1\.mlp\.c_fc"):
        cfg = ModelConfig(name_or_path="gpt2-tiny", lora=LoraConfig(enabled=True, r=2, target_modules=targets))
        matched = models.check_lora_targets(cfg, gpt2)
        peft_model = get_peft_model(GPT2LMHeadModel(gpt2), PeftLora(
            r=2, target_modules=targets if isinstance(targets, str) else list(targets)))
        adapted = {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
                   if hasattr(module, "lora_A")}
        assert set(matched) == adapted and matched, targets
    assert len(models.check_lora_targets(ModelConfig(lora=LoraConfig(enabled=True)), gpt2)) == 2 * 4  # no lm_head
