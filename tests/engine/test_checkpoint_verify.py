"""A damaged checkpoint is never loaded: every file of a checkpoint is in its manifest (size and sha256), a
resume verifies it, `latest` falls back to the previous checkpoint and the resumed run still equals an
uninterrupted one, and an explicit path that fails is an error. Also: a torn metrics.jsonl line, an export
killed half way, and a disk that fills up mid-save (a real one on a small tmpfs where the tests run as root).

One uninterrupted run (steps 2, 4, 6 saved, the last 2 kept) is built per module; each case copies it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from engine import lifecycle, models, train
from engine.checkpoint import MANIFEST, list_checkpoints, load_checkpoint, save_checkpoint
from tests.engine.runs import SMALL, TINY
from tests.engine.test_reliability import SETTINGS, _resumed_matches

FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json",
         MANIFEST]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from tests.engine.runs import run

    return run("sft.yaml", tmp_path_factory.mktemp("full"), *SETTINGS)


def _copy(uninterrupted, tmp_path: Path, *, keep_final: bool = False) -> Path:
    """The uninterrupted run's output_dir as a run killed after its last checkpoint, before the export."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted.output_dir, out)
    if not keep_final:
        shutil.rmtree(out / "final")
    return out


def _damage(file: Path, how: str) -> None:
    size = file.stat().st_size
    if how == "delete":
        file.unlink()
    elif how == "truncate":
        os.truncate(file, size // 2)
    else:  # zeros over the second half, the size unchanged: what a lost write-back can leave
        with open(file, "r+b") as handle:
            handle.seek(size // 2)
            handle.write(bytes(size - size // 2))


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """`python -m engine.train ARGV` in this process: (exit code, stderr). An exception other than the exits
    cli() makes (the traceback a user would see) fails the test."""
    sys_argv = sys.argv
    sys.argv = ["engine/train.py", "--config", str(TINY / "sft.yaml"), *SMALL, *SETTINGS, *argv]
    try:
        train.cli()
        code = 0
    except SystemExit as done:
        code = done.code
    finally:
        sys.argv = sys_argv
    return code, capsys.readouterr().err


def test_every_file_of_a_checkpoint_is_in_its_manifest(uninterrupted):
    step_6 = uninterrupted.output_dir / "checkpoints" / "step_6"
    assert sorted(p.name for p in step_6.iterdir()) == sorted(FILES)
    listed = json.loads((step_6 / MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(set(FILES) - {MANIFEST})
    assert listed["model.safetensors"]["size"] == (step_6 / "model.safetensors").stat().st_size


@pytest.mark.parametrize("how", ["truncate", "delete", "zero_tail"])
@pytest.mark.parametrize("name", FILES)
def test_latest_skips_a_damaged_checkpoint_and_the_resumed_run_still_equals_an_uninterrupted_one(
        tmp_path, uninterrupted, capsys, name, how):
    out = _copy(uninterrupted, tmp_path)
    _damage(out / "checkpoints" / "step_6" / name, how)
    capsys.readouterr()

    _resumed_matches(out, uninterrupted, first_step=5)  # steps 5 and 6 again, from step_4

    printed = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoints' / 'step_6'} skipped, it fails verification" in printed, printed
    assert name in printed.split("skipped", 1)[1].splitlines()[0]
    assert f"resuming from {out / 'checkpoints' / 'step_4'}" in printed


def test_an_explicit_checkpoint_that_fails_verification_is_an_error(tmp_path, uninterrupted, capsys, monkeypatch):
    out = _copy(uninterrupted, tmp_path)
    damaged = out / "checkpoints" / "step_6"
    _damage(damaged / "optimizer.bin", "zero_tail")
    monkeypatch.setattr(models, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))

    code, err = _cli(capsys, f"output_dir={out}", f"checkpoint.resume_from={damaged}")

    assert code == 2
    assert f"checkpoint.resume_from='{damaged}' fails verification" in err
    assert f"{damaged / 'optimizer.bin'} does not match its sha256" in err and "step_4" in err
    assert "Traceback" not in err


def test_a_checkpoint_from_before_manifests_resumes_with_a_warning_and_a_bad_rng_state_is_said(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, _ = accelerator.prepare(torch.nn.Linear(3, 2), torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    path = save_checkpoint(accelerator, tmp_path, {"step": 1, "position": {"step": 1}}, keep_last=1)
    (path / MANIFEST).unlink()
    state = json.loads((path / "trainer_state.json").read_text())
    del state[MANIFEST]
    (path / "trainer_state.json").write_text(json.dumps(state))
    from engine.checkpoint import resolve_resume

    with pytest.warns(UserWarning, match="no manifest.json .* loaded unverified"):
        assert resolve_resume(tmp_path, "latest") == (path, [])

    _damage(path / "random_states_0.pkl", "truncate")
    with pytest.warns(UserWarning, match="random_states_0.pkl cannot be read .* will not repeat the interrupted"):
        load_checkpoint(accelerator, path, [model])


def test_a_torn_last_line_of_metrics_jsonl_is_dropped_and_the_run_resumes(tmp_path, uninterrupted):
    out = _copy(uninterrupted, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_6")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:15])  # killed writing step 5

    with pytest.warns(UserWarning, match="metrics.jsonl: dropped its last line, torn"):
        _resumed_matches(out, uninterrupted, first_step=5)

    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_an_export_killed_half_way_leaves_no_final_dir(tmp_path, uninterrupted, monkeypatch):
    out = _copy(uninterrupted, tmp_path)
    real_save = models.save_final

    def killed_after_the_config(model, tokenizer, out_dir, **kwargs):
        Path(out_dir).mkdir(parents=True)
        model.config.save_pretrained(out_dir)
        raise KeyboardInterrupt  # as a kill would stop it: nothing after this is written

    monkeypatch.setattr(models, "save_final", killed_after_the_config)
    with pytest.raises(KeyboardInterrupt):
        _resumed_matches(out, uninterrupted, first_step=7)
    assert not (out / "final").exists()

    monkeypatch.setattr(models, "save_final", real_save)
    _resumed_matches(out, uninterrupted, first_step=7)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp")) == []


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                    'device" })'),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8640 vs 8528"),
], ids=["ENOSPC", "SafetensorError", "inline_container"])
def test_a_disk_full_mid_save_is_a_clear_error_and_the_partial_checkpoint_is_removed(tmp_path, capsys, monkeypatch,
                                                                                     error):
    real_save_state = Accelerator.save_state

    def full_at_step_4(self, output_dir, **kwargs):
        if output_dir.endswith(".tmp_step_4"):
            Path(output_dir).mkdir(parents=True)
            Path(output_dir, "model.safetensors").write_bytes(b"half")
            raise error
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_at_step_4)
    code, err = _cli(capsys, f"output_dir={tmp_path}", "checkpoint.resume_from=latest")

    assert code == 2, err
    assert "disk full while writing checkpoint step 4 (" in err and " GiB free" in err
    assert "earlier checkpoints are intact; free space and rerun the same command" in err
    assert "Traceback" not in err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_2"]


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_a_real_disk_that_fills_mid_save_then_gets_room_resumes_the_same_command(tmp_path, uninterrupted, capsys,
                                                                                 monkeypatch):
    """On a 160 MiB tmpfs: one checkpoint of the tiny model is ~32 MiB, so the start-up check (2 kept + 1 being
    saved) passes; a filler file then takes the free space as step 4 is saved. Deleted, the same command
    resumes from step 2 and ends where an uninterrupted run does."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "160m"):
        pytest.skip("needs root and `mount -t tmpfs` (a small real disk to fill)")
    try:
        out, filler, filled = disk / "run", disk / f"filler-{uuid.uuid4().hex}", []
        real_save = lifecycle.save_checkpoint

        def fill_then_save(accelerator, output_dir, state, **kwargs):
            if state["step"] == 4 and not filled:
                filled.append(filler)
                with open(filler, "wb") as file:  # all but 1 MiB: step 4's weights do not fit
                    file.write(bytes(shutil.disk_usage(disk).free - (1 << 20)))
            return real_save(accelerator, output_dir, state, **kwargs)

        monkeypatch.setattr(lifecycle, "save_checkpoint", fill_then_save)
        code, err = _cli(capsys, f"output_dir={out}", "checkpoint.resume_from=latest")
        assert code == 2, err[-3000:]
        assert "disk full while writing checkpoint step 4 (0.00 GiB free" in err and "Traceback" not in err
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]

        filler.unlink()
        code, err = _cli(capsys, f"output_dir={out}", "checkpoint.resume_from=latest")
        assert code == 0, err[-3000:]
        _resumed_matches(out, uninterrupted, first_step=7)  # the same weights as the uninterrupted run's
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6]
        full = [json.loads(line)["loss"] for line in (uninterrupted.output_dir / "metrics.jsonl").read_text().splitlines()]
        again = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert again == pytest.approx(full, rel=1e-5)
        assert [p.name for p in list_checkpoints(out)] == ["step_4", "step_6"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
