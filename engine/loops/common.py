"""What the sft, reward and pairwise loops share: loaders with a resumable data position, the optimizer and
its schedule, the micro-batches of each optimizer step with their share of the step's loss, the optimizer
step itself (skipped when its gradient is not finite), weighted metric means, resuming, stopping on a signal
or after too many non-finite steps, and the final save.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Sampler

from data import length_grouped_batches, sequence_lengths
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
from engine.config import ConfigError, OptimConfig, RunConfig
from engine.logging import RunLogger
from engine.validate import check_gradient_flow, sharding_mode

SKIPPED = "train/skipped"  # 1.0 in optimizer_step's metrics when the update was not applied


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


class EpochSampler(Sampler[int]):
    """An order seeded by (seed, epoch), identical on every process; Accelerate shards its batches.

    Replaying an epoch's order is what lets a resumed run skip exactly the batches it had consumed. With
    `lengths`, the order is data.length_grouped_batches' (whole batches of similar length, shuffled)."""

    def __init__(self, size: int, seed: int, *, lengths: list[int] | None = None, batch_size: int = 1):
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths, self.batch_size = lengths, batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.lengths is not None:
            batches = length_grouped_batches(self.lengths, self.batch_size, seed=self.seed + self.epoch, drop_last=True)
            return iter([index for batch in batches for index in batch])
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size if self.lengths is None else self.size // self.batch_size * self.batch_size


def train_loader(dataset, collate, cfg: RunConfig, family: str) -> DataLoader:
    lengths = sequence_lengths(family, dataset) if cfg.data.group_by_length else None
    sampler = EpochSampler(len(dataset), cfg.seed, lengths=lengths, batch_size=cfg.batch.micro_batch_size)
    # drop_last keeps every micro-batch the same size and every optimizer step the same number of them. The
    # loader's own generator keeps iterator start-up from drawing on the global RNG (dropout's), which a
    # resumed run restores from the checkpoint.
    loader = DataLoader(dataset, batch_size=cfg.batch.micro_batch_size, sampler=sampler, collate_fn=collate,
                        drop_last=True, generator=torch.Generator().manual_seed(cfg.seed))
    return loader


def eval_loader(dataset, collate, cfg: RunConfig) -> DataLoader | None:
    if dataset is None or len(dataset) == 0 or not cfg.eval.every_steps:
        return None
    return DataLoader(dataset, batch_size=cfg.batch.eval_batch_size or cfg.batch.micro_batch_size, collate_fn=collate,
                      generator=torch.Generator().manual_seed(cfg.seed))


def total_steps(cfg: RunConfig, accelerator: Accelerator, loader: DataLoader) -> int:
    """Optimizer steps of the run: max_steps, or epochs x the steps in one pass (after sharding)."""
    steps_per_epoch = len(loader) // accelerator.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split gives {len(loader)} micro-batch(es) per process, fewer than one optimizer step "
            f"needs ({accelerator.gradient_accumulation_steps}); lower batch.global_batch_size or add data"
        )
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors), as nanoGPT;
    torch's fused kernel unless `optim.fused` is false, the parameters' device has none, or (when unset)
    the run is under FSDP or DeepSpeed. Built before `accelerator.prepare`: on CPU or CUDA parameters."""
    check_gradient_flow(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    kwargs = {"lr": optim.lr, "betas": optim.betas, "eps": optim.eps}
    if optim.optimizer == "adamw":
        # auto leaves FSDP and DeepSpeed, which wrap or shard the optimizer, on the loop kernel
        sharded = any(os.environ.get(f"ACCELERATE_USE_{x}", "").lower() in ("1", "true") for x in ("FSDP", "DEEPSPEED"))
        fused = optim.fused if optim.fused is not None else not sharded and has_fused_adamw(params)
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if optim.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, **kwargs)


def has_fused_adamw(params: list[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter (floating point, on a supported device).

    torch checks only at the first `step()`, so the engine asks beforehand; the device list is private
    torch API, and without it the answer is no."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except (ImportError, AttributeError):
        return False
    return all(p.is_floating_point() and p.device.type in devices for p in params)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total: int):
    """Linear warmup to the peak lr, then constant, linear or cosine decay to 0 at step `total`."""
    warmup = optim.warmup_steps or int(optim.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if optim.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if optim.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_steps(accelerator: Accelerator, loader, position: Position, total: int) -> Iterator[list[dict]]:
    """The micro-batches of each optimizer step, pass after pass, from `position` until step `total`.

    The caller counts `position.step`; this keeps `position.epoch` and `position.batches_in_epoch`."""
    accum = accelerator.gradient_accumulation_steps
    while position.step < total:
        # The prepared loader hands the epoch to the sampler (and to the skipping loader built from it).
        loader.set_epoch(position.epoch)
        batches = accelerator.skip_first_batches(loader, position.batches_in_epoch) if position.batches_in_epoch else loader
        group = []
        for batch in batches:
            group.append(batch)
            if len(group) == accum:
                position.batches_in_epoch += accum
                yield group
                group = []
                if position.step >= total:
                    return
        position.epoch, position.batches_in_epoch = position.epoch + 1, 0


def loss_shares(accelerator: Accelerator, counts: list) -> torch.Tensor:
    """Each micro-batch's share of the units (tokens or pairs) in the optimizer step, over all processes.

    Accelerate divides each micro-batch loss by the accumulation steps and DDP averages over processes, so
    a loss scaled by share x steps x processes gives the gradient of the mean over every unit of the global
    batch, however it is split into micro-batches (1 x 8 equals 8 x 1)."""
    counts = torch.stack([torch.as_tensor(c, dtype=torch.float32) for c in counts]).to(accelerator.device)
    total = accelerator.reduce(counts.sum(), "sum").clamp(min=1)
    return counts / total * (accelerator.gradient_accumulation_steps * accelerator.num_processes)


def optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, max_grad_norm: float | None) -> dict:
    """Clip, step, advance the schedule and clear the gradients; call when `accelerator.sync_gradients`.

    A non-finite gradient norm (a NaN or inf loss makes one) skips the update: no optimizer or scheduler
    step, the gradients cleared, `SKIPPED` 1.0 in the metrics. The norm is of the gradients synced over the
    processes, and the flag is reduced too, so every process skips the same steps. Under fp16 the gradient
    scaler skips the optimizer step itself (and lowers its scale); the schedule waits in the same way."""
    metrics = {"lr": optimizer.param_groups[0]["lr"]}
    norm = clip_gradients(accelerator, model.parameters(), max_grad_norm)
    bad = torch.zeros(1, device=accelerator.device)
    if norm is not None:
        metrics["grad_norm"] = norm
        bad += (~torch.isfinite(torch.as_tensor(norm, dtype=torch.float32))).float().to(accelerator.device)
    skipped = accelerator.reduce(bad, "max").item() > 0 if accelerator.num_processes > 1 else bad.item() > 0
    if accelerator.scaler is not None:
        optimizer.step()  # the scaler needs the step to see the inf and lower its scale
        skipped = skipped or optimizer.step_was_skipped
    elif not skipped:
        optimizer.step()
    if not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    metrics[SKIPPED] = float(skipped)
    return metrics


# Launches after which every process holds whole gradients as plain tensors (synced by DDP in backward):
# one process, or data parallelism on any device. FSDP, DeepSpeed, XLA and Megatron-LM clip their own way.
PLAIN_DATA_PARALLEL = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                       "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON")


def clip_gradients(accelerator: Accelerator, parameters, max_norm: float | None) -> torch.Tensor | None:
    """Scale the gradients down to a total norm of `max_norm` where it is above (0 or None: only measure, as
    transformers reads max_grad_norm); the norm before clipping, as `accelerator.clip_grad_norm_` returns it.

    torch's clip multiplies every gradient by min(1, max_norm / (norm + 1e-6)), a full pass over all of them
    even when that factor is 1. With plain gradients (PLAIN_DATA_PARALLEL, no device mesh) this takes the steps
    accelerate takes (unscale fp16 gradients, norm, clip) with torch's arithmetic, but multiplies only when the
    factor is below 1. Reading that comparison on the host is a sync, which optimizer_step's skip check makes
    anyway."""
    max_norm = max_norm or None  # 0 would scale every gradient to zero
    plain = (accelerator.distributed_type.value in PLAIN_DATA_PARALLEL
             and getattr(accelerator, "parallelism_config", None) is None  # tensor or context parallel: DTensors
             and hasattr(torch.nn.utils, "clip_grads_with_norm_"))  # torch >= 2.6
    if not plain:
        # an infinite max_norm measures the norm and scales the gradients by exactly 1
        return accelerator.clip_grad_norm_(parameters, math.inf if max_norm is None else max_norm)
    accelerator.unscale_gradients()
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if max_norm is not None and (max_norm / (norm + 1e-6) < 1).item():
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def eval_batches(accelerator: Accelerator, loader, max_batches: int | None) -> Iterator[tuple[dict, bool]]:
    """This process's batches of the prepared eval `loader`, each with whether it is among the first
    `max_batches` batches of the split (all when None), counted as one process would see them.

    Round i gives process p the split's batch i x N + p. The rounds stop once every batch they hold is past
    the limit; in the last round, a process whose batch is past it still runs its forward (sharded models
    need every process in every forward) and its rows must weigh nothing. So 1 process and N score the
    same rows."""
    for index, batch in enumerate(loader):
        first = index * accelerator.num_processes
        if max_batches is not None and first >= max_batches:
            return
        yield batch, max_batches is None or first + accelerator.process_index < max_batches


def real_rows(accelerator: Accelerator, rows: int) -> int:
    """How many of this process's `rows` in the current evaluation batch are real samples, not padding.

    A prepared loader gives every process as many full batches: the last round is completed with samples
    from the start of the split, which a metric summed over processes would count twice. Those repeats sit
    after the `remainder` real samples of the round, in process order (what `gather_for_metrics` drops).
    Every process still runs its forward on the whole batch: sharded models (FSDP, ZeRO-3) need each
    process in every forward."""
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return rows
    return max(0, min(rows, state.remainder - accelerator.process_index * rows))


class MeanMetrics:
    """Weighted means of metric dicts over micro-batches and processes (weights: tokens, pairs or rows)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.weight = 0.0

    def add(self, metrics: dict, weight) -> None:
        weight = float(weight)
        for key, value in metrics.items():
            value = torch.as_tensor(value).detach().float().cpu() * weight
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.weight += weight

    def compute(self, accelerator: Accelerator) -> dict[str, float]:
        keys = sorted(self.sums)
        packed = torch.stack([self.sums[k] for k in keys] + [torch.tensor(self.weight)]).to(accelerator.device)
        packed = accelerator.reduce(packed, "sum").cpu()
        return {key: (packed[i] / packed[-1]).item() for i, key in enumerate(keys)}


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


def shards_weights(accelerator: Accelerator) -> bool:
    """Whether each process holds only shards of the weights: FSDP or DeepSpeed ZeRO-3."""
    return sharding_mode(accelerator) is not None


def save_final(accelerator: Accelerator, cfg: RunConfig, model, tokenizer, logger: RunLogger, total: int,
               state_dict: dict | None = None, also=None) -> RunResult:
    """`<output_dir>/final/`: the model (or adapter, or merged model) and tokenizer, from the main process.

    With sharded weights the full state dict is gathered first, on every process (a collective), unless the
    caller passes it as `state_dict`; the main process writes it once, with `also(directory)` if given (more
    parts beside it), into `.tmp_final` renamed into place: a run killed mid-export leaves no `final/`
    that looks like a model, and a full disk leaves nothing half written."""
    from engine import models

    final_dir = Path(cfg.output_dir) / "final"
    tmp = final_dir.with_name(FINAL_TMP)
    accelerator.wait_for_everyone()
    if state_dict is None and shards_weights(accelerator):
        state_dict = accelerator.get_state_dict(model)
    full = False
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            models.save_final(accelerator.unwrap_model(model), tokenizer, tmp, merge=cfg.export.merge,
                              state_dict=state_dict)
            if also is not None:
                also(tmp)
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
