"""What a training run must not depend on: interruption, the micro-batch split, the reference mode."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine import lifecycle
from engine.checkpoint import list_checkpoints
from engine.tiny import resolve_model_path
from tests.engine.runs import run, series


class Interrupted(Exception):
    pass


def test_resume_from_latest_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    # LoRA, so the checkpoint holds the adapter only; 6 steps over 4 micro-batches per epoch, so the
    # interruption at step 3 falls mid-epoch and the resumed run must skip exactly the batches consumed.
    settings = ["max_steps=6", "model.lora.enabled=true", "model.lora.r=4", "optim.lr=3e-3",
                "checkpoint.every_steps=3", "optim.scheduler=cosine", "optim.warmup_steps=2"]
    full = run("sft.yaml", tmp_path / "full", *settings)

    after_step = lifecycle.after_step

    def interrupt_at_step_3(accelerator, cfg, logger, position, *args):
        after_step(accelerator, cfg, logger, position, *args)
        if position.step == 3:
            raise Interrupted

    monkeypatch.setattr(lifecycle, "after_step", interrupt_at_step_3)
    with pytest.raises(Interrupted):
        run("sft.yaml", tmp_path / "cut", *settings)
    monkeypatch.undo()

    (checkpoint,) = list_checkpoints(tmp_path / "cut")
    assert checkpoint.name == "step_3"
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as saved:
        assert saved.keys() and all("lora_" in key for key in saved.keys())

    resumed = run("sft.yaml", tmp_path / "cut", *settings, "checkpoint.resume_from=latest")
    assert [r["step"] for r in resumed.history if "loss" in r] == [4, 5, 6]
    for key in ("loss", "lr", "grad_norm"):
        assert series(resumed, key) == pytest.approx(series(full, key)[3:], rel=1e-5, abs=1e-7)
    full_weights = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    resumed_weights = load_file(tmp_path / "cut" / "final" / "adapter_model.safetensors")
    for name, value in full_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-5, atol=1e-6)


def test_one_micro_batch_of_8_equals_8_accumulated_micro_batches_of_1(tmp_path):
    # SFT rows have different numbers of trained tokens, so this holds only if each micro-batch's loss is
    # weighted by its share of the step's tokens. With eps=1, Adam's first update lr * g / (|g| + eps) is a
    # smooth function of the gradient, so equal updates mean equal gradients (with the default eps it is
    # lr * sign(g), which flips on float noise wherever g is ~0).
    settings = ["max_steps=1", "optim.lr=0.1", "optim.eps=1.0", "optim.max_grad_norm=null", "optim.scheduler=constant"]
    whole = run("sft.yaml", tmp_path / "whole", *settings, "batch.micro_batch_size=8")
    split = run("sft.yaml", tmp_path / "split", *settings, "batch.micro_batch_size=1")

    assert split.last("loss") == pytest.approx(whole.last("loss"), rel=1e-6)
    assert split.last("tokens") == whole.last("tokens")
    initial = load_file(f"{resolve_model_path('tiny')}/model.safetensors")
    after_whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    after_split = load_file(tmp_path / "split" / "final" / "model.safetensors")
    largest = 0.0
    for name, start in initial.items():
        update_whole, update_split = after_whole[name] - start, after_split[name] - start
        torch.testing.assert_close(update_split, update_whole, rtol=1e-4, atol=1e-8)
        largest = max(largest, update_whole.abs().max().item())
    assert largest > 1e-3


def test_the_three_reference_modes_give_the_same_dpo_losses(tmp_path):
    # Step 1: policy == reference, loss log 2 everywhere. Step 2: the policy has moved and the reference
    # has not, so every mode must give the starting model's log-probs.
    settings = ["max_steps=2", "model.lora.enabled=true", "model.lora.r=4", "optim.lr=5e-3",
                f"reference.cache_dir={tmp_path / 'cache'}"]
    losses = {
        mode: series(run("dpo.yaml", tmp_path / mode, *settings, f"reference.mode={mode}"), "loss")
        for mode in ("copy", "disabled", "precomputed")
    }
    assert list((tmp_path / "cache").glob("ref-logps-*.safetensors"))
    assert losses["copy"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses["copy"][1] - math.log(2)) > 1e-4
    for mode in ("disabled", "precomputed"):
        assert losses[mode] == pytest.approx(losses["copy"], rel=1e-5, abs=1e-6)
