"""What the sft, reward and pairwise loops share, the loops over a fixed training split (PPO makes its data as
it goes): `setup` prepares the model, optimizer, schedule and loaders; `train_steps` resumes, evaluates at
step 0 and runs every optimizer step, each over `accumulation` micro-batches weighted by their share of the
step's units (tokens or pairs).

A loop keeps what is its own: loading its model and data, the loss of one micro-batch, the units that weigh
it, and its evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from engine import lifecycle, loaders, optim
from engine.config import ConfigError, RunConfig
from engine.logging import RunLogger
from engine.metrics import MeanMetrics
from losses import pair_fields


@dataclass
class Run:
    """The prepared parts of a training run, as `setup` returns them."""

    model: torch.nn.Module  # wrapped by Accelerate (DDP, FSDP, DeepSpeed); the loop's forward calls this one
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    eval_loader: DataLoader | None  # None without eval rows or eval.every_steps
    total: int  # optimizer steps of the run


def setup(cfg: RunConfig, accelerator: Accelerator, model: torch.nn.Module, train_rows, eval_rows, collate,
          family: str) -> Run:
    """Loaders over the rows (eval rows may be None), optimizer and schedule, placed and sharded by Accelerate."""
    train_loader = loaders.train_loader(train_rows, collate, cfg, family)
    eval_loader = loaders.eval_loader(eval_rows, collate, cfg)
    optimizer = optim.build_optimizer(model, cfg.optim)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loader = accelerator.prepare(eval_loader) if eval_loader is not None else None
    total = loaders.total_steps(cfg, accelerator, train_loader)
    scheduler = accelerator.prepare(optim.build_scheduler(optimizer, cfg.optim, total))
    return Run(model, optimizer, scheduler, train_loader, eval_loader, total)


def train_steps(cfg: RunConfig, accelerator: Accelerator, run: Run, loss_on: Callable[[dict], tuple[torch.Tensor, dict]],
                *, units: Callable[[dict], torch.Tensor | int], evaluate: Callable[[], dict[str, float]], desc: str,
                sum_as: str | None = None) -> RunLogger:
    """Resume, then optimizer steps until `run.total`; the run's logger, for the final save.

    `loss_on(batch)` is a micro-batch's (loss, metrics), `units(batch)` what its loss averages over (trained
    tokens, pairs): the micro-batch's share of the step's loss and its weight in the logged means.
    `evaluate()` runs at step 0 and on eval.every_steps when the run has an eval loader. `sum_as` names a
    logged key holding the step's units summed over every process."""
    # 1. Resume: weights, optimizer, schedule, RNG states and the data position.
    position = lifecycle.resume(accelerator, cfg, [run.model])
    logger = RunLogger.for_run(cfg, accelerator, total_steps=run.total, start_step=position.step, desc=desc)
    evaluate = evaluate if run.eval_loader is not None else None
    if evaluate is not None and position.step == 0:
        logger.log(0, evaluate())  # where every eval curve starts

    # 2. Optimizer steps, each over `accumulation` micro-batches.
    run.model.train()
    for micro_batches in loaders.optimizer_steps(accelerator, run.train_loader, position, run.total):
        # 2a. Weight each micro-batch by its share of the step's units (all processes).
        counts = [units(batch) for batch in micro_batches]
        shares = optim.loss_shares(accelerator, counts)
        step_metrics = MeanMetrics()
        for batch, count, share in zip(micro_batches, counts, shares):
            with accelerator.accumulate(run.model):
                # 2b. The loop's forward and objective.
                loss, metrics = loss_on(batch)
                # 2c. Backward; gradients are synced across processes on the last micro-batch only.
                accelerator.backward(loss * share)
                if accelerator.sync_gradients:
                    step_info = optim.optimizer_step(accelerator, run.model, run.optimizer, run.scheduler,
                                                     cfg.optim.max_grad_norm)
            step_metrics.add({"loss": loss, **metrics}, count)

        # 3. Log, evaluate and checkpoint on their schedules.
        position.step += 1
        metrics = step_metrics.compute(accelerator) | {k: float(v) for k, v in step_info.items()}
        if sum_as is not None:
            metrics[sum_as] = float(accelerator.reduce(sum(counts), "sum"))
        lifecycle.after_step(accelerator, cfg, logger, position, run.total, metrics, evaluate)
    return logger


def pair_columns(cfg: RunConfig, objective, data) -> tuple[str, ...]:
    """The per-pair columns (`margin`, `soft_label`) the reward and pairwise loops pass to the objective
    (`losses.pair_fields`). An objective that reads `soft_label` trains on it, so data without the column is
    a ConfigError naming data.path, before the first step."""
    fields = pair_fields(objective)
    if "soft_label" in fields and "soft_label" not in data.train.column_names:
        raise ConfigError(f"objective {objective.name!r} reads each pair's 'soft_label' (the probability that "
                          f"chosen is preferred), and data.path={cfg.data.path!r} has no such column; label the "
                          "pairs with `python -m engine.label`, or pick an objective of hard labels")
    return fields
