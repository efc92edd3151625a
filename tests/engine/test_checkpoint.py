"""Checkpoints are complete or invisible, the last K are kept, and the schedule has the hand-computed shape."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from engine.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from engine.config import OptimConfig, RunConfig, from_dict
from engine.lifecycle import resume
from engine.optim import build_scheduler


def _prepared():
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def test_only_the_last_k_complete_checkpoints_are_kept_and_found(tmp_path):
    accelerator, model, _ = _prepared()
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, {"step": step, "position": {"step": step}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4", "step_6"]

    # An interrupted save: a temporary directory, and a step directory without its state file.
    (tmp_path / "checkpoints" / ".tmp_step_8").mkdir()
    (tmp_path / "checkpoints" / "step_10").mkdir()
    latest, skipped = resolve_resume(tmp_path, "latest")
    assert latest.name == "step_6" and [(p.name, "trainer_state.json is missing" in why) for p, why in skipped] == [
        ("step_10", True)]
    assert resolve_resume(tmp_path, "none") == (None, [])
    assert resolve_resume(tmp_path / "fresh", "latest") == (None, [])
    with pytest.raises(FileNotFoundError, match="step_10"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step_10"))


def test_a_checkpoint_restores_the_weights(tmp_path):
    accelerator, model, _ = _prepared()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_checkpoint(accelerator, tmp_path, {"step": 1, "position": {"step": 1, "epoch": 0}}, keep_last=1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    state = load_checkpoint(accelerator, path, [model])
    assert state["position"] == {"step": 1, "epoch": 0}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def test_a_partly_frozen_model_saves_only_its_trainable_weights(tmp_path):
    accelerator, model, _ = _prepared()
    model.bias.requires_grad_(False)
    path = save_checkpoint(accelerator, tmp_path, {"step": 1, "position": {}}, keep_last=1)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as saved:
        assert list(saved.keys()) == ["weight"]
    assert load_checkpoint(accelerator, path, [model])["trainable_only"] is True


@pytest.mark.parametrize(
    "scheduler, expected",
    [
        # warmup 2 of 6 steps: (s + 1) / 3 for s < 2, then decay over the remaining 4 steps
        ("constant", [1 / 3, 2 / 3, 1, 1, 1, 1]),
        ("linear", [1 / 3, 2 / 3, 1, 3 / 4, 1 / 2, 1 / 4]),
        ("cosine", [1 / 3, 2 / 3, 1, (1 + math.cos(math.pi / 4)) / 2, 1 / 2, (1 + math.cos(3 * math.pi / 4)) / 2]),
    ],
)
def test_the_learning_rate_schedule(scheduler, expected):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    schedule = build_scheduler(optimizer, OptimConfig(lr=2.0, scheduler=scheduler, warmup_steps=2), total=6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([2.0 * f for f in expected], rel=1e-12)


def test_warmup_ratio_is_a_fraction_of_the_run():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    build_scheduler(optimizer, OptimConfig(lr=1.0, scheduler="constant", warmup_ratio=0.5), total=8)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 / 5)


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path, capsys):
    """A run saved steps 2, 4, 6; resumed from step_2, steps 4 and 6 belong to the run it abandons. Left in
    place, `latest` would resume from the abandoned step 6, and keep_last=2 would delete the new run's step 4
    in favour of it. They are renamed `step_<N>.abandoned-<time>` (nothing deleted) with a line naming them."""
    accelerator, model, _ = _prepared()
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, {"step": step, "position": {"step": step}}, keep_last=3)
    root = tmp_path / "checkpoints"
    cfg = from_dict(RunConfig, {"output_dir": str(tmp_path), "checkpoint": {"resume_from": str(root / "step_2")}})

    position = resume(accelerator, cfg, [model])

    assert position.step == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]
    aside = sorted(p.name for p in root.iterdir() if ".abandoned-" in p.name)
    assert [name.split(".")[0] for name in aside] == ["step_4", "step_6"]
    assert all((root / name / "trainer_state.json").is_file() for name in aside)  # moved whole, not deleted
    printed = capsys.readouterr().out
    assert all(name in printed for name in aside)
    # the resumed run saves its own step 4 and keeps it; `latest` finds it, not the abandoned step 6
    save_checkpoint(accelerator, tmp_path, {"step": 4, "position": {"step": 4}}, keep_last=2)
    assert resolve_resume(tmp_path, "latest")[0].name == "step_4"
    assert sorted(p.name for p in root.iterdir() if ".abandoned-" in p.name) == aside

    # resuming from the newest checkpoint moves nothing
    resume(accelerator, from_dict(RunConfig, {"output_dir": str(tmp_path), "checkpoint": {"resume_from": "latest"}}),
           [model])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_4"]
