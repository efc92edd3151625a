"""Smoke runs of every family through the entry point on CPU: each moves the metric it exists to move."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from engine.config import load_config
from tests.engine.runs import REPO_ROOT, TINY, mean, run, series


def test_sft_lowers_the_loss_and_writes_every_output(tmp_path):
    result = run("sft.yaml", tmp_path, "max_steps=10", "optim.lr=3e-3", "eval.every_steps=10", "eval.max_batches=2")

    losses = series(result, "loss")
    assert len(losses) == 10
    assert mean(losses[-3:]) < 0.6 * mean(losses[:2])
    assert 0.0 <= result.last("eval/token_accuracy") <= 1.0
    assert result.last("eval/perplexity") == pytest.approx(math.exp(result.last("eval/loss")), rel=1e-6)
    assert result.last("lr") > 0

    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(result.history)
    saved = load_config(tmp_path / "config.yaml")
    assert saved.max_steps == 10 and saved.optim.lr == 3e-3 and saved.output_dir == str(tmp_path)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["objective"] == {"name": "sft"}

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert isinstance(model, torch.nn.Module)
    assert (tmp_path / "final" / "tokenizer.json").exists()


# 16 pairs, all of them in every optimizer step (2 micro-batches of 8): the training-pair accuracy is exact.
PAIRS = ["data.max_samples=16", "batch.global_batch_size=16", "batch.micro_batch_size=8", "optim.lr=1e-3"]


def test_reward_model_learns_to_rank_the_training_pairs(tmp_path):
    result = run("reward.yaml", tmp_path, "max_steps=12", *PAIRS)

    # A random head may already rank many pairs right by chance (length differs between the responses), so
    # the pairs must end up all but separated, with the loss and the margin moving accordingly.
    accuracies, losses, margins = (series(result, k) for k in ("rewards/accuracies", "loss", "rewards/margins"))
    assert mean(accuracies[-3:]) >= 0.95
    assert mean(accuracies[-3:]) >= accuracies[0]
    assert mean(losses[-3:]) < 0.5 * losses[0]
    assert mean(margins[-3:]) > margins[0] + 1.0


@pytest.mark.parametrize("config, extra", [("dpo.yaml", ["objective.beta=0.1"]), ("orpo.yaml", ["objective.lam=1.0"])])
def test_preference_objectives_raise_reward_accuracy_on_the_training_pairs(tmp_path, config, extra):
    result = run(config, tmp_path, "max_steps=12", *PAIRS, *extra)

    accuracies = series(result, "rewards/accuracies")
    assert mean(accuracies[-3:]) >= 0.9
    assert mean(series(result, "rewards/margins")[-3:]) > 0


def test_an_objective_from_outside_the_library_trains_through_the_config(tmp_path):
    result = run("orpo.yaml", tmp_path, "objective.name=tests.engine.simpo_objective:simpo_loss",
                 "objective.beta=2.0", "objective.gamma=0.5", "max_steps=12", *PAIRS)

    assert load_config(tmp_path / "config.yaml").objective.kwargs == {"beta": 2.0, "gamma": 0.5}
    accuracies = series(result, "rewards/accuracies")
    assert mean(accuracies[-3:]) >= 0.9


def test_the_command_line_runs_a_config_and_reports_bad_input(tmp_path):
    command = [sys.executable, "engine/train.py", "--config", str(TINY / "sft.yaml"), f"output_dir={tmp_path}",
               "max_steps=2", "data.max_samples=16", "batch.global_batch_size=8", "batch.micro_batch_size=4",
               "eval.every_steps=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert "2/2" in done.stderr  # the progress bar

    typo = subprocess.run([*command, "optim.lrr=1e-4"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert typo.returncode == 2
    assert "did you mean 'optim.lr'" in typo.stderr


def test_a_lora_run_exports_an_adapter_for_plain_peft_or_a_merged_model(tmp_path):
    from peft import PeftModel

    from engine.tiny import resolve_model_path

    settings = ["max_steps=2", "model.lora.enabled=true", "model.lora.r=4", "optim.lr=1e-2"]
    run("sft.yaml", tmp_path / "adapter", *settings)
    run("sft.yaml", tmp_path / "merged", *settings, "export.merge=true")
    assert (tmp_path / "adapter" / "final" / "adapter_config.json").exists()
    assert not (tmp_path / "merged" / "final" / "adapter_config.json").exists()

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter" / "final")(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "final")(ids).logits
    assert not torch.allclose(adapted, before, atol=1e-4)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "config, options",
    [
        ("sft.yaml", ["mixed_precision=bf16"]),
        ("sft.yaml", ["optim.optimizer=adamw_8bit"]),
        ("sft.yaml", ["optim.optimizer=paged_adamw_8bit", "data.group_by_length=true"]),
        ("dpo.yaml", ["model.lora.enabled=true", "model.gradient_checkpointing=true", "reference.mode=disabled"]),
        ("dpo.yaml", ["model.quant.bits=4", "model.quant.compute_dtype=float32", "model.lora.enabled=true",
                      "reference.mode=disabled"]),
        ("reward.yaml", ["model.lora.enabled=true", "model.gradient_checkpointing=true"]),
    ],
    ids=["bf16", "adamw_8bit", "paged_8bit+length_groups", "lora+checkpointing", "qlora_4bit", "reward_lora"],
)
def test_each_memory_and_precision_option_trains(tmp_path, config, options):
    """Every step sees the same 8 rows (one batch is the whole training set), so the loss can only fall by
    learning: after two updates it was 0.70 (SFT) and 0.94-0.96 (DPO, reward) of its start; 1.0 with optim.lr=0."""
    result = run(config, tmp_path, "max_steps=3", "data.max_samples=8", *options)
    losses = series(result, "loss")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.98 * losses[0], losses
    assert (tmp_path / "final").is_dir()


def test_packed_sft_batches_give_the_padded_loss(tmp_path):
    padded = run("sft.yaml", tmp_path / "padded", "max_steps=2")
    packed = run("sft.yaml", tmp_path / "packed", "max_steps=2", "data.packing=true")
    assert series(packed, "loss") == pytest.approx(series(padded, "loss"), rel=1e-4)
    assert series(packed, "tokens") == series(padded, "tokens")
