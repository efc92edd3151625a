"""A run's life around its optimizer steps: its data position, resuming from a checkpoint, what follows each
step (logging, evaluation and checkpoints on their schedules; stopping on a signal or after too many
non-finite steps), and the final save.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from engine import signals, tracking
from engine.checkpoint import (
    FINAL_TMP,
    any_process,
    clean_partial,
    disk_full_error,
    is_disk_full,
    load_checkpoint,
    publish,
    resolve_resume,
    save_checkpoint,
    set_aside_later,
)
from engine.config import ConfigError, RunConfig
from engine.logging import RunLogger
from engine.optim import SKIPPED
from engine.validate import sharding_mode


@dataclass
class Position:
    """Where a run stands; saved in every checkpoint so that a resumed run takes the very next batch."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the pass over the training split in progress
    batches_in_epoch: int = 0  # micro-batches of that pass consumed by each process
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient
    bad_in_a_row: int = 0  # of those, how many end the run so far without a good step between


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_by: int | None = None
    """The signal that stopped the run early (a checkpoint holds its state); None when it ran to the end."""

    def last(self, key: str) -> float:
        """The latest logged value of `key`."""
        return next(record[key] for record in reversed(self.history) if key in record)

    def first(self, key: str) -> float:
        return next(record[key] for record in self.history if key in record)


class RunStopped(Exception):
    """A SIGTERM or SIGINT stopped the run after an optimizer step and a checkpoint. It leaves `train.main` as
    KeyboardInterrupt did (an in-process caller stops too); the command line exits with `signals.exit_code`."""

    def __init__(self, result: RunResult, checkpoint: Path, is_main_process: bool = True):
        super().__init__(f"stopped by signal {result.stopped_by} after step {result.steps}; "
                         f"resume with checkpoint.resume_from=latest (saved {checkpoint})")
        self.result, self.is_main_process = result, is_main_process


class TrainingDiverged(RuntimeError):
    """`optim.max_bad_steps` optimizer steps in a row had a non-finite loss or gradient."""


def load_resume(accelerator: Accelerator, cfg: RunConfig, models: list) -> tuple[Path, dict] | None:
    """Load `checkpoint.resume_from` (models, optimizer, scheduler, RNG states); its path and saved state, or
    None for a fresh start. `latest` skips the newer checkpoints that fail verification, with a line each.
    Checkpoints of output_dir past the loaded step belong to the abandoned run: they are renamed aside
    (`checkpoint.set_aside_later`), with a line naming them."""
    if accelerator.is_main_process:
        clean_partial(cfg.output_dir)
    path, skipped = resolve_resume(cfg.output_dir, cfg.checkpoint.resume_from)
    for bad, problem in skipped:
        accelerator.print(f"checkpoint {bad} skipped, it fails verification: {problem}; "
                          f"{'resuming from ' + str(path) if path else 'none left, starting fresh'}")
    if path is None:
        return None
    state = load_checkpoint(accelerator, path, models)
    accelerator.wait_for_everyone()  # every process has read `path` before anything is renamed
    if accelerator.is_main_process:
        moved = set_aside_later(cfg.output_dir, state["step"])
        if moved:
            accelerator.print(f"resumed from step {state['step']} ({path}); the later checkpoints of the run it "
                              f"abandons are set aside, not loaded by 'latest': {', '.join(str(p) for p in moved)}")
    return path, state


def resume(accelerator: Accelerator, cfg: RunConfig, models: list) -> Position:
    """Load `checkpoint.resume_from` (see `load_resume`) and return its data position."""
    loaded = load_resume(accelerator, cfg, models)
    if loaded is None:
        return Position()
    path, state = loaded
    position = Position(**state["position"])
    # batches_in_epoch counts one process's micro-batches; a checkpoint written by another number of processes
    # (or micro-batch size) consumed the same samples of the same epoch order, so skip as many samples here.
    here = {"processes": accelerator.num_processes, "micro_batch_size": cfg.batch.micro_batch_size}
    layout = state.get("data_layout", here)
    samples = position.batches_in_epoch * layout["processes"] * layout["micro_batch_size"]
    per_batch = here["processes"] * here["micro_batch_size"]
    if samples % per_batch:
        raise ConfigError(f"{path} stopped {samples} samples into its epoch, not a whole number of micro-batches of "
                          f"{cfg.batch.micro_batch_size} x {accelerator.num_processes} process(es); resume with "
                          f"batch.micro_batch_size={layout['micro_batch_size']} or a process count that divides it")
    position.batches_in_epoch = samples // per_batch
    return position


def after_step(accelerator: Accelerator, cfg: RunConfig, logger: RunLogger, position: Position, total: int,
               metrics: dict[str, float], evaluate, extra_state: dict | None = None) -> None:
    """Log, evaluate and checkpoint on their schedules, once an optimizer step is done; then stop if a signal
    arrived (RunStopped) or the last `optim.max_bad_steps` steps were all skipped (TrainingDiverged), each
    after saving a checkpoint. `extra_state` joins the checkpoint's state (e.g. a KL controller's)."""
    logger.advance()
    count_skipped(position, metrics, logger)
    last = position.step == total
    if position.step % cfg.logging.every_steps == 0 or last:
        logger.log(position.step, metrics)
    if evaluate is not None and (position.step % cfg.eval.every_steps == 0 or last):
        logger.log(position.step, evaluate())

    def save() -> Path:
        state = {"step": position.step, "position": asdict(position), **(extra_state or {}),
                 "trackers": tracking.run_ids(accelerator),  # so a resumed run continues the same tracker runs
                 "data_layout": {"processes": accelerator.num_processes, "micro_batch_size": cfg.batch.micro_batch_size}}
        return save_checkpoint(accelerator, cfg.output_dir, state, keep_last=cfg.checkpoint.keep_last)

    saved = None
    if cfg.checkpoint.every_steps and (position.step % cfg.checkpoint.every_steps == 0 or last):
        saved = save()
    stop_if_needed(accelerator, cfg, logger, position, last, saved, save)


def count_skipped(position: Position, metrics: dict[str, float], logger: RunLogger) -> None:
    """Move optimizer_step's per-step `SKIPPED` flag into the position's counts and the logged total."""
    if metrics.pop(SKIPPED, 0.0):
        position.skipped_steps += 1
        position.bad_in_a_row += 1
        logger.write(f"step {position.step}: non-finite loss or gradient; update skipped "
                     f"({position.bad_in_a_row} in a row, {position.skipped_steps} in all)")
    else:
        position.bad_in_a_row = 0
    metrics["train/skipped_steps"] = float(position.skipped_steps)


def stop_if_needed(accelerator: Accelerator, cfg: RunConfig, logger: RunLogger, position: Position, last: bool,
                   saved: Path | None, save) -> None:
    """Raise TrainingDiverged or RunStopped once `save()` has written (or `saved` holds) this step's state.

    Both checks give the same answer on every process: the skip flags are reduced in optimizer_step, the
    signal in signals.stop_requested (a collective, so every process calls it every step)."""
    diverged = bool(cfg.optim.max_bad_steps) and position.bad_in_a_row >= cfg.optim.max_bad_steps
    signum = signals.stop_requested(accelerator)
    if diverged:
        path = saved or save()
        logger.close()
        first = position.step - position.bad_in_a_row + 1
        raise TrainingDiverged(
            f"steps {first}-{position.step}: {position.bad_in_a_row} optimizer steps in a row had a non-finite "
            f"loss or gradient (optim.max_bad_steps={cfg.optim.max_bad_steps}), so none was applied. The last "
            f"good weights are in {path}. Lower optim.lr, set optim.max_grad_norm, use bf16 rather than fp16, or "
            "look at the data of these steps; resume with checkpoint.resume_from=latest")
    if signum and not last:
        path = saved or save()
        logger.write(f"signal {signum}: stopped after step {position.step}; checkpoint {path}")
        logger.close()
        raise RunStopped(RunResult(Path(cfg.output_dir), None, position.step, logger.history, signum), path,
                         accelerator.is_main_process)


StateDictOf = Callable[[str | None], dict | None]
"""save_final's slice of the gathered state dict by submodule name (all of it for None); None when not sharded."""


def shards_weights(accelerator: Accelerator) -> bool:
    """Whether each process holds only shards of the weights: FSDP or DeepSpeed ZeRO-3."""
    return sharding_mode(accelerator) is not None


def save_final(accelerator: Accelerator, cfg: RunConfig, model, tokenizer, logger: RunLogger, total: int, *,
               part: str | None = None, extras: Callable[[Any, Path, StateDictOf], None] | None = None) -> RunResult:
    """`<output_dir>/final/`: the model (or adapter, or merged model) and tokenizer, from the main process.

    `model` is the prepared model; `part` names the submodule of it saved as the model (PPO's actor-critic
    saves its `policy`), and `extras(unwrapped_model, directory, state_dict_of)` writes more files beside it
    (PPO's value head and critic). With sharded weights (FSDP, ZeRO-3) the unwrapped modules hold only this
    process's shards or empty placeholders, so the full state dict is gathered first, on every process (a
    collective), and each part is written from its slice, `state_dict_of(name)` (None when not sharded). The
    main process writes into `.tmp_final`, renamed into place: a run killed mid-export leaves no `final/`
    that looks like a model, and a full disk leaves nothing half written."""
    from engine import models

    final_dir = Path(cfg.output_dir) / "final"
    tmp = final_dir.with_name(FINAL_TMP)
    accelerator.wait_for_everyone()
    gathered = accelerator.get_state_dict(model) if shards_weights(accelerator) else None

    def state_dict_of(name: str | None) -> dict | None:
        if gathered is None or name is None:
            return gathered
        return {key.removeprefix(f"{name}."): value for key, value in gathered.items() if key.startswith(f"{name}.")}

    full = False
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        try:
            models.save_final(getattr(unwrapped, part) if part else unwrapped, tokenizer, tmp,
                              merge=cfg.export.merge, state_dict=state_dict_of(part))
            if extras is not None:
                extras(unwrapped, tmp, state_dict_of)
            publish(tmp, final_dir)
        except Exception as error:
            shutil.rmtree(tmp, ignore_errors=True)
            if not is_disk_full(error):
                raise
            full = True
    if any_process(accelerator, full):  # the other processes wait here rather than in a barrier for ever
        raise disk_full_error("final/", final_dir.parent)
    accelerator.wait_for_everyone()
    logger.close()
    return RunResult(Path(cfg.output_dir), final_dir, total, logger.history)
