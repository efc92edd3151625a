"""`model.attn_implementation: auto` on architectures without SDPA (Gemma-2, DeBERTa-v2), and a forced
choice the class cannot do refused at start-up, in training, generation and evaluation."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from engine import models
from engine.config import ConfigError, ModelConfig
from engine.tiny import resolve_model_path
from tests.engine.runs import REPO_ROOT, run

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _with_tiny_tokenizer(model, out):
    """`model` saved to `out` beside the tiny tokenizer (its vocabulary and special tokens)."""
    tiny = Path(resolve_model_path("tiny"))
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copy(tiny / name, out / name)
    return out


def _tiny_ids():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=32, max_position_embeddings=512, sliding_window=512,
                          **_tiny_ids())
    return _with_tiny_tokenizer(Gemma2ForCausalLM(config), tmp_path_factory.mktemp("gemma2"))


@pytest.fixture(scope="module")
def deberta(tmp_path_factory):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                             max_position_embeddings=512, num_labels=1, **_tiny_ids())
    return _with_tiny_tokenizer(DebertaV2ForSequenceClassification(config), tmp_path_factory.mktemp("deberta"))


def test_auto_is_sdpa_where_the_class_has_it_and_eager_where_not(gemma2, deberta, capsys):
    assert models.resolve_attention(ModelConfig(name_or_path="tiny")) == "sdpa"
    assert models.resolve_attention(ModelConfig(name_or_path=str(gemma2))) == "eager"
    assert models.resolve_attention(ModelConfig(name_or_path=str(deberta)), kind="reward") == "eager"
    assert "Gemma2ForCausalLM has no SDPA attention; using eager" in capsys.readouterr().out
    reward = models.load_reward_model(ModelConfig(name_or_path=str(deberta)), for_training=False)
    assert reward.config._attn_implementation == "eager"


def test_forced_sdpa_on_a_class_without_it_is_refused_naming_the_key(gemma2, deberta):
    with pytest.raises(ConfigError, match="model.attn_implementation=sdpa: Gemma2ForCausalLM does not support it"):
        models.resolve_attention(ModelConfig(name_or_path=str(gemma2), attn_implementation="sdpa"))
    with pytest.raises(ConfigError, match="reward_model.attn_implementation=sdpa: DebertaV2ForSequenceClassification"):
        models.resolve_attention(ModelConfig(name_or_path=str(deberta), attn_implementation="sdpa"), kind="reward",
                                 key="reward_model.attn_implementation")
    with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package"):
        models.resolve_attention(ModelConfig(name_or_path="tiny", attn_implementation="flash_attention_2"))


def test_sft_on_gemma2_trains_under_the_default(gemma2, tmp_path):
    result = run("sft.yaml", tmp_path, f"model.name_or_path={gemma2}", "max_steps=6", "optim.lr=3e-3")
    assert result.last("loss") < result.first("loss") - 0.1


def test_a_forced_choice_exits_2_at_start_up_in_train_generate_and_evaluate(gemma2, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    commands = [
        ["engine.train", "--config", str(REPO_ROOT / "configs/tiny/sft.yaml"), f"output_dir={tmp_path}",
         f"model.name_or_path={gemma2}", "model.attn_implementation=sdpa"],
        ["engine.generate", "--model", str(gemma2), "--prompts", "synthetic", "--num-prompts", "2",
         "--attn-implementation", "sdpa"],
        ["engine.evaluate", "--model", str(gemma2), "--pairs", "none", "--attn-implementation", "sdpa"],
    ]
    for command in commands:
        done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=180,
                              cwd=REPO_ROOT, env=env)
        assert done.returncode == 2, (command[0], done.stderr[-2000:])
        assert "model.attn_implementation=sdpa: Gemma2ForCausalLM does not support it" in done.stderr
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "final").exists()


def test_generate_and_evaluate_run_gemma2_with_the_flag(gemma2, tmp_path):
    from engine import evaluate, generate

    rows = generate.main(["--model", str(gemma2), "--prompts", "synthetic", "--num-prompts", "3",
                          "--max-new-tokens", "4", "--attn-implementation", "eager",
                          "--output", str(tmp_path / "out.jsonl")])
    assert len(rows) == 3
    result = evaluate.main(["--model", str(gemma2), "--reference", str(gemma2), "--pairs", "none",
                            "--num-prompts", "4", "--max-new-tokens", "4", "--attn-implementation", "auto"])
    # the model against itself, with the same sampling seed: no KL
    assert abs(result["metrics"]["objective/kl"]) < 1e-4, json.dumps(result["metrics"])


@pytest.mark.parametrize("config, overrides, key", [
    ("dpo.yaml", ["reference.name_or_path={gemma2}", "model.attn_implementation=sdpa"], "model.attn_implementation"),
    ("ppo.yaml", ["model.name_or_path=tiny", "ppo.critic={gemma2}", "model.attn_implementation=sdpa"],
     "model.attn_implementation"),
    ("ppo.yaml", ["model.name_or_path=tiny", "reward_model.name_or_path={deberta}", "ppo.rewards=[]",
                  "reward_model.attn_implementation=sdpa"], "reward_model.attn_implementation"),
    ("ppo.yaml", ["model.name_or_path=tiny", "ppo.rewards=[{name: rm, model: '{deberta}'}]",
                  "model.attn_implementation=sdpa"], "model.attn_implementation"),
    ("reward.yaml", ["model.name_or_path={deberta}", "model.attn_implementation=sdpa"], "model.attn_implementation"),
])
def test_every_model_a_run_loads_is_checked_before_any_loads(tmp_path, monkeypatch, capsys, gemma2, deberta, config,
                                                              overrides, key):
    """The reference, the critic and PPO's reward models too: exit 2 at start-up naming the key, no traceback."""
    from engine import train
    from tests.engine.runs import SMALL, TINY

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_policy", refuse)
    monkeypatch.setattr(models, "load_reward_model", refuse)
    overrides = [o.replace("{gemma2}", str(gemma2)).replace("{deberta}", str(deberta)) for o in overrides]
    monkeypatch.setattr(sys, "argv", ["engine/train.py", "--config", str(TINY / config), f"output_dir={tmp_path}",
                                      *SMALL, *overrides])
    with pytest.raises(SystemExit) as stopped:
        train.cli()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and f"error: {key}=sdpa: " in err and "does not support it" in err, err


def test_a_deberta_reward_model_trains_under_the_default(tmp_path, deberta):
    losses = [r["loss"] for r in run("reward.yaml", tmp_path, f"model.name_or_path={deberta}", "max_steps=2").history]
    assert len(losses) == 2 and all(map(math.isfinite, losses))
