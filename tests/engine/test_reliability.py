"""Faults lose nothing: a run killed with SIGKILL mid-step or mid-save, or stopped by SIGTERM, resumes from its
latest checkpoint and continues with the losses of an uninterrupted run; non-finite steps are skipped, and
too many in a row stop the run with the last good weights saved.

The interrupted runs are real processes (`python -m tests.engine.test_reliability <fault> <step> <ready>
<train args>`): the fault hook below pauses the run at a chosen point and writes <ready>, and the test sends
the signal then, so the point of the kill is exact rather than a race against a timer.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import clean_partial, list_checkpoints, save_checkpoint
from engine.lifecycle import TrainingDiverged
from losses import register, sft_loss
from tests.engine.runs import REPO_ROOT, SMALL, TINY, run, series

# 6 steps of 8 rows over 32 rows (4 steps per epoch): the resumed steps cross an epoch boundary.
SETTINGS = ["max_steps=6", "optim.lr=3e-3", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            "optim.warmup_steps=1"]


@register("nan_sft", family="sft")
def nan_sft(logprobs: torch.Tensor, mask: torch.Tensor, *, nan_calls: tuple[int, ...] = ()):
    """The SFT loss, times NaN on the listed calls (1-based; one call per optimizer step here)."""
    nan_sft.calls = getattr(nan_sft, "calls", 0) + 1
    loss, metrics = sft_loss(logprobs, mask)
    return (loss * math.nan if nan_sft.calls in nan_calls else loss), metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run("sft.yaml", tmp_path_factory.mktemp("full"), *SETTINGS)


def _start(fault: str, step: int, output_dir: Path, *overrides: str, processes: int = 1
           ) -> tuple[subprocess.Popen, Path]:
    ready = output_dir.parent / f"{output_dir.name}.ready"
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, "-m", "tests.engine.test_reliability", fault, str(step), str(ready),
               "--config", str(TINY / "sft.yaml"), f"output_dir={output_dir}", *SMALL, *SETTINGS, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run never reached its fault point:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.05)
    return process, ready


def _resumed_matches(output_dir: Path, uninterrupted, first_step: int):
    resumed = run("sft.yaml", output_dir, *SETTINGS, "checkpoint.resume_from=latest")
    assert [r["step"] for r in resumed.history if "loss" in r] == list(range(first_step, 7))
    for key in ("loss", "lr", "grad_norm"):
        assert series(resumed, key) == pytest.approx(series(uninterrupted, key)[first_step - 1:], rel=1e-5, abs=1e-7)
    full = load_file(uninterrupted.output_dir / "final" / "model.safetensors")
    again = load_file(output_dir / "final" / "model.safetensors")
    for name, value in full.items():
        torch.testing.assert_close(again[name], value, rtol=1e-5, atol=1e-6)
    return resumed


def test_sigkill_mid_step_resumes_from_the_last_checkpoint_exactly(tmp_path, uninterrupted):
    process, _ = _start("pause_in_step", 5, tmp_path / "run")  # inside step 5, before its update
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_2", "step_4"]
    _resumed_matches(tmp_path / "run", uninterrupted, first_step=5)


def test_sigkill_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, uninterrupted):
    process, _ = _start("pause_in_save", 4, tmp_path / "run")  # optimizer.bin of step 4 half written
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    root = tmp_path / "run" / "checkpoints"
    partial = root / ".tmp_step_4"
    assert (partial / "model.safetensors").exists() and not (partial / "trainer_state.json").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_2"]

    _resumed_matches(tmp_path / "run", uninterrupted, first_step=3)
    assert not partial.exists()
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_6"]


def test_sigterm_finishes_the_step_saves_and_exits_then_resumes_exactly(tmp_path, uninterrupted):
    # checkpoint.every_steps=2, so the checkpoint of step 3 exists only because of the signal.
    process, _ = _start("wait_for_signal", 3, tmp_path / "run")  # inside step 3, before its update
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by signal 15 after step 3" in output and "Traceback" not in output
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_2", "step_3"]
    assert not (tmp_path / "run" / "final").exists()
    _resumed_matches(tmp_path / "run", uninterrupted, first_step=4)


def test_in_process_a_signal_raises_run_stopped_and_the_handlers_are_restored(tmp_path, monkeypatch):
    from engine import lifecycle, optim

    step_fn, calls = optim.optimizer_step, []

    def signalled_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, once: the step still finishes
        return step_fn(*args, **kwargs)

    monkeypatch.setattr(optim, "optimizer_step", signalled_in_step_2)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(lifecycle.RunStopped, match="stopped by signal 2 after step 2") as stopped:
        run("sft.yaml", tmp_path, *SETTINGS)
    assert stopped.value.result.stopped_by == signal.SIGINT and stopped.value.result.steps == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]
    assert signal.getsignal(signal.SIGINT) is before


def test_ppo_stops_on_a_signal_after_its_iteration_and_resumes_from_it(tmp_path, monkeypatch):
    from engine import lifecycle, optim
    from tests.engine.test_ppo_runs import SMALL as PPO_SMALL
    from tests.engine.test_ppo_runs import run_ppo

    step_fn, calls = optim.optimizer_step, []

    def signalled_in_the_first_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_fn(*args, **kwargs)

    settings = [*PPO_SMALL, "max_steps=2", "checkpoint.every_steps=0"]
    monkeypatch.setattr(optim, "optimizer_step", signalled_in_the_first_update)
    with pytest.raises(lifecycle.RunStopped, match="stopped by signal 15 after step 1"):
        run_ppo(tmp_path, *settings)
    monkeypatch.undo()
    assert len(calls) == 4  # the iteration's 2 epochs x 2 minibatches all ran
    (saved,) = list_checkpoints(tmp_path)
    state = json.loads((saved / "trainer_state.json").read_text())
    assert saved.name == "step_1" and {"kl_controller", "scorer"} <= state.keys()
    resumed = run_ppo(tmp_path, *settings, "checkpoint.resume_from=latest")
    assert [r["step"] for r in resumed.history] == [2] and resumed.last("train/skipped_steps") == 0


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    # Two processes under torchrun; SIGTERM reaches rank 1 only, inside step 3. Rank 0 (which writes the
    # checkpoint and prints) learns of it through the all-reduced flag: no rank is left waiting in a collective.
    process, ready = _start("wait_for_signal_on_rank_1", 3, tmp_path / "run", "batch.micro_batch_size=4",
                              processes=2)
    os.kill(int(ready.read_text()), signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert "stopped by signal 15 after step 3" in output, output[-3000:]
    step_3 = tmp_path / "run" / "checkpoints" / "step_3"
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_2", "step_3"]
    assert sorted(p.name for p in step_3.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert f"exitcode  : {128 + signal.SIGTERM}" in output or process.returncode == 128 + signal.SIGTERM


NAN_SETTINGS = ["max_steps=5", "optim.lr=3e-3", "checkpoint.every_steps=1", "checkpoint.keep_last=5",
                "objective.name=tests.engine.test_reliability:nan_sft", "optim.scheduler=linear"]


def test_a_nan_loss_skips_its_update_and_is_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(nan_sft, "calls", 0, raising=False)
    result = run("sft.yaml", tmp_path, *NAN_SETTINGS, "objective.nan_calls=[2, 3]")

    assert series(result, "train/skipped_steps") == [0, 1, 2, 2, 2]
    losses = series(result, "loss")
    assert [math.isnan(x) for x in losses] == [False, True, True, False, False]
    # Steps 2 and 3 changed nothing: not the weights, not Adam's moments, not the schedule.
    step = {n: tmp_path / "checkpoints" / f"step_{n}" for n in (1, 3)}
    for name in ("model.safetensors",):
        after_1, after_3 = load_file(step[1] / name), load_file(step[3] / name)
        for key, value in after_1.items():
            assert torch.equal(after_3[key], value), key
    adam_1, adam_3 = (torch.load(step[n] / "optimizer.bin", weights_only=False)["state"] for n in (1, 3))
    for index, moments in adam_1.items():
        assert torch.equal(adam_3[index]["exp_avg"], moments["exp_avg"])
    lrs = series(result, "lr")  # linear decay over 5 steps: 1, 4/5, 4/5, 4/5, 3/5 of the peak
    assert lrs == pytest.approx([3e-3 * f for f in (1, 0.8, 0.8, 0.8, 0.6)], rel=1e-9)
    final = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())
    assert not torch.equal(final["lm_head.weight"], load_file(step[1] / "model.safetensors")["lm_head.weight"])


def test_too_many_nan_steps_in_a_row_stop_with_the_last_good_weights_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(nan_sft, "calls", 0, raising=False)
    with pytest.raises(TrainingDiverged, match=r"steps 3-4: 2 optimizer steps in a row .*optim.max_bad_steps=2"):
        run("sft.yaml", tmp_path, *NAN_SETTINGS, "objective.nan_calls=[3, 4, 5]", "optim.max_bad_steps=2",
            "checkpoint.every_steps=0", "optim.scheduler=constant")

    (saved,) = list_checkpoints(tmp_path)
    assert saved.name == "step_4"
    assert not (tmp_path / "final").exists()
    # The saved weights are those after step 2, the last good one: step 2 alone reproduces them.
    monkeypatch.setattr(nan_sft, "calls", 0, raising=False)
    two = run("sft.yaml", tmp_path / "two", *NAN_SETTINGS, "max_steps=2", "optim.scheduler=constant")
    good = load_file(tmp_path / "two" / "checkpoints" / "step_2" / "model.safetensors")
    for key, value in load_file(saved / "model.safetensors").items():
        assert torch.equal(value, good[key]), key
    assert two.last("train/skipped_steps") == 0


def _saver(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(3, 2), torch.optim.AdamW([torch.nn.Parameter(
        torch.zeros(1))]))

    def save(step: int, keep_last: int = 2) -> Path:
        return save_checkpoint(accelerator, tmp_path, {"step": step, "position": {"step": step}}, keep_last=keep_last)

    return save


def test_every_file_is_flushed_to_disk_before_the_rename_publishes_it(tmp_path, monkeypatch):
    save, synced, published = _saver(tmp_path), set(), []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def checked_replace(src, dst):
        if Path(src).name.startswith(".tmp_step_"):
            files = [str(p) for p in Path(src).rglob("*")] + [str(src)]
            assert set(files) <= synced, sorted(set(files) - synced)
            published.append(Path(dst).name)
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", checked_replace)
    save(1)
    assert published == ["step_1"] and str(tmp_path / "checkpoints") in synced  # the parent, for the rename


def test_a_step_saved_again_and_every_kind_of_leftover_are_handled(tmp_path):
    save = _saver(tmp_path)
    root = tmp_path / "checkpoints"
    save(2)
    save(2)  # a resumed run writes the step it resumed from again
    save(4)
    save(6)  # keep_last=2: step_2 goes
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_6"]

    # Killed between setting step_6 aside and renaming its replacement in: the set-aside copy comes back.
    os.replace(root / "step_6", root / ".old_step_6")
    shutil.copytree(root / "step_4", root / ".tmp_step_6")
    # Killed while deleting a pruned checkpoint: renamed away first, so never taken for a checkpoint.
    shutil.copytree(root / "step_4", root / ".deleting_step_2")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4"]
    removed = clean_partial(tmp_path)
    assert sorted(p.name for p in removed) == [".deleting_step_2", ".tmp_step_6"]
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_6"]
    assert json.loads((root / "step_6" / "trainer_state.json").read_text())["step"] == 6


# ---- the fault points of the subprocess runs -------------------------------------------------------------


def _pause(ready: Path, until=lambda: False, seconds: float = 300) -> None:
    ready.write_text(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        time.sleep(0.02)


def _main(fault: str, step: int, ready: Path, argv: list[str]) -> None:
    from engine import optim, signals, train

    step_fn, calls = optim.optimizer_step, []

    def optimizer_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step and fault == "pause_in_step":
            _pause(ready)
        if len(calls) == step and fault == "wait_for_signal":
            _pause(ready, until=lambda: signals.received() is not None, seconds=60)
        if len(calls) == step and fault == "wait_for_signal_on_rank_1" and os.environ.get("RANK") == "1":
            _pause(ready, until=lambda: signals.received() is not None, seconds=60)
        return step_fn(*args, **kwargs)

    torch_save = torch.save

    def save(obj, f, *args, **kwargs):
        if fault == "pause_in_save" and f".tmp_step_{step}" in str(f) and "optimizer" in str(f):
            buffer = io.BytesIO()
            torch_save(obj, buffer)
            Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            _pause(ready)
        return torch_save(obj, f, *args, **kwargs)

    optim.optimizer_step = optimizer_step
    torch.save = save
    sys.argv = ["engine/train.py", *argv]
    train.cli()


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
