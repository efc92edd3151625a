"""Checkpoints: `accelerator.save_state` into `<output_dir>/checkpoints/step_<N>`, written atomically.

A checkpoint holds the trained weights (only the trainable ones when part of the model is frozen, so a
LoRA run saves its adapter, not a copy of the base), the optimizer, the scheduler, the gradient scaler,
every process's RNG states, and `trainer_state.json` with the data position. It is written into a
temporary directory `.tmp_step_<N>`, every file is flushed to disk (fsync), `trainer_state.json` is
written last, and the directory is renamed into place (one atomic rename, then an fsync of the parent).
A run killed at any point of a save (kill -9, a node lost) therefore leaves the previous checkpoints
intact: only directories named `step_<N>` that hold `trainer_state.json` are ever loaded, and the
leftover temporary directory is deleted by the next save or resume. The last `keep_last` are kept.
Resuming from a checkpoint earlier than the newest abandons the later ones: they are renamed
`step_<N>.abandoned-<time>` (never loaded or deleted), with a line naming them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import weakref
from pathlib import Path

from accelerate import Accelerator
from safetensors import safe_open

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_PARTIAL = (".tmp_step_*", ".old_step_*", ".deleting_step_*")
_hooked: weakref.WeakSet = weakref.WeakSet()


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: str | Path, resume_from: str) -> Path | None:
    """`checkpoint.resume_from` -> the checkpoint to load: "none" -> None, "latest" -> the newest one in
    output_dir (None when there is none yet), otherwise a checkpoint directory that must exist."""
    if resume_from in ("none", "", None):
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"checkpoint.resume_from={resume_from!r} is not a checkpoint directory (no {STATE_FILE}); "
            f"use 'latest', 'none', or one of {[str(p) for p in list_checkpoints(output_dir)] or 'the step_<N> dirs'}"
        )
    return path


def set_aside_later(output_dir: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints in output_dir past `step` to `step_<N>.abandoned-<time>`; returns the new paths.

    Resuming from an earlier checkpoint abandons the later ones, but left in place `latest` would pick them up
    at the next resume, and `keep_last` would count them and delete the new run's instead. The new names are
    neither loaded nor deleted by anything here. Call on the main process only."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for path in list_checkpoints(output_dir):
        if int(_STEP_DIR.match(path.name).group(1)) > step:
            target = path.with_name(f"{path.name}.abandoned-{stamp}")
            os.replace(path, target)
            moved.append(target)
    if moved:
        _fsync_dir(checkpoint_root(output_dir))
    return moved


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: dict, *, keep_last: int) -> Path:
    """Save everything `load_checkpoint` needs to continue exactly; `state` must hold "step"."""
    _keep_trainable_only(accelerator)
    root = checkpoint_root(output_dir)
    final = root / f"step_{state['step']}"
    tmp = root / f".tmp_step_{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**state, "trainable_only": any(tmp.glob(".trainable_only_*"))}
        _fsync_tree(tmp)
        _write_synced(tmp / STATE_FILE, json.dumps(state, indent=2))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run): set the old copy aside, not delete it
            old = root / f".old_step_{state['step']}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        for stale in list_checkpoints(output_dir)[:-keep_last]:
            doomed = root / f".deleting_{stale.name}"  # renamed first, so a half-deleted one is never loaded
            os.replace(stale, doomed)
            shutil.rmtree(doomed)
        clean_partial(output_dir)
    accelerator.wait_for_everyone()
    return final


def clean_partial(output_dir: str | Path) -> list[Path]:
    """Delete what interrupted saves left behind (never loaded anyway); call on the main process only."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    for old in root.glob(".old_step_*"):  # killed between setting a step aside and replacing it
        final = root / old.name.removeprefix(".old_")
        if not final.exists() and (old / STATE_FILE).is_file():
            os.replace(old, final)
    partial = [path for pattern in _PARTIAL for path in root.glob(pattern)]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def load_checkpoint(accelerator: Accelerator, path: str | Path, models: list) -> dict:
    """Restore models, optimizers, schedulers and RNG states saved by `save_checkpoint`; returns its state.

    `models` are the prepared models in the order they were passed to `accelerator.prepare`."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    partial = state.get("trainable_only", False)
    if partial:
        for index, model in enumerate(models):
            file = path / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
            with safe_open(str(file), framework="pt") as saved:
                missing = _trainable_names(model) - set(saved.keys())
            if missing:
                raise ValueError(f"{path} does not match this model: {len(missing)} trainable tensors missing, "
                                 f"e.g. {sorted(missing)[:3]}; was it saved with another model or LoRA config?")
    accelerator.load_state(str(path), strict=not partial)
    return state


def _trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def _keep_trainable_only(accelerator: Accelerator) -> None:
    """Register (once) a hook that drops frozen weights from the saved state dicts."""
    if accelerator in _hooked:
        return
    _hooked.add(accelerator)

    def hook(models, weights, output_dir):
        for index, model in enumerate(models):
            params = dict(model.named_parameters())
            trainable = _trainable_names(model)
            if index < len(weights) and len(trainable) < len(params):
                weights[index] = {k: v for k, v in weights[index].items() if k in trainable}
                Path(output_dir, f".trainable_only_{index}").touch()

    accelerator.register_save_state_pre_hook(hook)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories, so a rename never publishes unwritten data."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
