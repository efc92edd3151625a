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

The last file written before the rename is `manifest.json`: the size and sha256 of every other file. A
resume verifies it first, so a checkpoint damaged after it was written (a truncated, missing or zeroed file)
is never loaded: `latest` falls back to the newest one that verifies, naming those it skipped, and an
explicit path is an error. A disk that fills up mid-save is a CheckpointError naming the step and the free
space; the partial directory is removed and the earlier checkpoints stay as they were.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
import weakref
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open

from engine.config import ConfigError

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
FINAL_TMP = ".tmp_final"  # beside final/ in output_dir
_CHUNK = 8 << 20  # sha256 reads files in pieces, so a weight file of many GiB never sits in memory whole
# What a full disk raises mid-write: the OS, safetensors (a Rust IoError), torch.save's zip writer.
_DISK_FULL_TEXT = ("No space left", "StorageFull", "unexpected pos", "file write failed")
_verified: dict[tuple, str | None] = {}
_STEP_DIR = re.compile(r"^step_(\d+)$")
_PARTIAL = (".tmp_step_*", ".old_step_*", ".deleting_step_*")
_hooked: weakref.WeakSet = weakref.WeakSet()


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


class CheckpointError(ConfigError):
    """A checkpoint that fails verification, or a save the disk had no room for; the command line exits 2."""


def _step_dirs(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (verified or not), oldest first."""
    return [path for path in _step_dirs(output_dir) if (path / STATE_FILE).exists()]


def resolve_resume(output_dir: str | Path, resume_from: str) -> tuple[Path | None, list[tuple[Path, str]]]:
    """`checkpoint.resume_from` -> (the checkpoint to load, the (checkpoint, reason) pairs skipped).

    "none" -> None; "latest" -> the newest step directory of output_dir that verifies (None when there is
    none), skipping the newer ones that do not; otherwise a checkpoint directory that must verify
    (CheckpointError if not)."""
    if resume_from in ("none", "", None):
        return None, []
    if resume_from == "latest":
        skipped = []
        for path in reversed(_step_dirs(output_dir)):
            problem = verify_checkpoint(path)
            if problem is None:
                return path, skipped
            skipped.append((path, problem))
        return None, skipped
    path = Path(resume_from)
    if not path.is_dir() or not any((path / name).is_file() for name in (STATE_FILE, MANIFEST)):
        raise FileNotFoundError(
            f"checkpoint.resume_from={resume_from!r} is not a checkpoint directory (no {STATE_FILE}); "
            f"use 'latest', 'none', or one of {[str(p) for p in list_checkpoints(output_dir)] or 'the step_<N> dirs'}"
        )
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint.resume_from={resume_from!r} fails verification: {problem}. Resume from another "
            f"checkpoint ({', '.join(p.name for p in list_checkpoints(output_dir) if p != path) or 'none left'}) "
            "or checkpoint.resume_from=latest, which takes the newest one that verifies")
    return path, []


def verify_checkpoint(path: str | Path) -> str | None:
    """What is wrong with the checkpoint at `path` (a file missing, of the wrong size, or whose sha256 differs
    from the manifest's), or None when it is whole. One written before manifests existed is taken as it is,
    with a warning. The answer is kept for as long as no file of the directory changes."""
    path = Path(path)
    stats = [(str(p), p.stat()) for p in sorted(path.rglob("*")) if p.is_file()]
    key = (str(path.resolve()), tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats))
    if key not in _verified:
        _verified[key] = _verify(path)
    return _verified[key]


def _verify(path: Path) -> str | None:
    if not (path / MANIFEST).is_file():
        if not (path / STATE_FILE).is_file():
            return f"{path / STATE_FILE} is missing"
        try:
            written_with_one = json.loads((path / STATE_FILE).read_text()).get(MANIFEST, False)
        except (ValueError, UnicodeDecodeError) as error:
            return f"{path / STATE_FILE} is unreadable ({error})"
        if written_with_one:
            return f"{path / MANIFEST} is missing"
        warnings.warn(f"{path} has no {MANIFEST} (saved before checkpoints carried one): loaded unverified",
                      stacklevel=3)
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as error:
        return f"{path / MANIFEST} is unreadable ({error})"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{file} is {size:,} bytes, the manifest says {expected['size']:,} (truncated or overwritten)"
        if _sha256(file) != expected["sha256"]:
            return f"{file} does not match its sha256 in the manifest (its contents changed since the save)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _write_synced(directory / MANIFEST, json.dumps({"files": entries}, indent=1))


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is how a write into a full disk (or an exceeded quota) surfaced."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(error, (SafetensorError, RuntimeError, OSError)) and any(
        text in str(error) for text in _DISK_FULL_TEXT)


def disk_full_error(what: str, directory: Path) -> CheckpointError:
    free = shutil.disk_usage(directory if directory.exists() else directory.parent).free
    return CheckpointError(f"disk full while writing {what} ({free / 1024**3:.2f} GiB free under {directory}); "
                           "earlier checkpoints are intact; free space and rerun the same command "
                           "(with checkpoint.resume_from=latest)")


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
    full = False
    try:
        accelerator.save_state(str(tmp))
    except Exception as error:
        if not is_disk_full(error):
            raise
        full = True
    if accelerator.is_main_process and not full:
        try:
            state = {**state, "trainable_only": any(tmp.glob(".trainable_only_*")), MANIFEST: True}
            _fsync_tree(tmp)
            _write_synced(tmp / STATE_FILE, json.dumps(state, indent=2))
            _write_manifest(tmp)  # last: a checkpoint with a manifest was written whole
            _fsync_dir(tmp)
        except Exception as error:
            if not is_disk_full(error):
                raise
            full = True
    # every process learns of a failure on any (a plain barrier here would leave the others waiting)
    if any_process(accelerator, full):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise disk_full_error(f"checkpoint step {state['step']}", root)
    if accelerator.is_main_process:
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


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is true on any process (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "max").item() > 0


def clean_partial(output_dir: str | Path) -> list[Path]:
    """Delete what interrupted saves (and exports) left behind, never loaded anyway; call on the main process
    only."""
    root = checkpoint_root(output_dir)
    for old in root.glob(".old_step_*"):  # killed between setting a step aside and replacing it
        final = root / old.name.removeprefix(".old_")
        if not final.exists() and (old / STATE_FILE).is_file():
            os.replace(old, final)
    partial = [path for pattern in _PARTIAL for path in root.glob(pattern)] if root.is_dir() else []
    partial += [path for path in [Path(output_dir) / FINAL_TMP] if path.exists()]
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
    rng = path / f"random_states_{accelerator.process_index}.pkl"
    try:  # Accelerate logs an unreadable RNG state at info level and goes on; the run would then differ unseen
        if rng.exists():  # absent where fewer processes saved the checkpoint
            torch.load(rng, weights_only=False)
    except Exception as error:
        warnings.warn(f"{rng} cannot be read ({type(error).__name__}: {error}): the resumed run draws other random "
                      "numbers (dropout, shuffles, sampling) and will not repeat the interrupted run exactly",
                      stacklevel=2)
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


def publish(tmp: Path, target: Path) -> None:
    """Flush `tmp` to disk and rename it to `target`, replacing what was there; call on the main process."""
    _fsync_tree(tmp)
    _fsync_dir(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


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
