"""Loaders with a resumable data position: the training order seeded by (seed, epoch), the batches of each
step from a saved position on, the length of a run in optimizer steps, and evaluation batches that count
the same rows on one process or many.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Sampler

from data import length_grouped_batches, sequence_lengths
from engine.config import ConfigError, RunConfig
from engine.lifecycle import Position


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


def optimizer_steps(accelerator: Accelerator, loader, position: Position, total: int) -> Iterator[list[dict]]:
    """The micro-batches of each optimizer step, pass after pass, from `position` until step `total`."""
    return step_batches(accelerator, loader, position, total, accelerator.gradient_accumulation_steps)


def step_batches(accelerator: Accelerator, loader, position: Position, total: int, per_step: int
                 ) -> Iterator[list[dict]]:
    """The `per_step` batches of each step (an optimizer step's micro-batches, a PPO iteration's one batch of
    prompts), pass after pass, from `position` until step `total`.

    The caller counts `position.step`; this keeps `position.epoch` and `position.batches_in_epoch`."""
    while position.step < total:
        # The prepared loader hands the epoch to the sampler (and to the skipping loader built from it).
        loader.set_epoch(position.epoch)
        batches = accelerator.skip_first_batches(loader, position.batches_in_epoch) if position.batches_in_epoch else loader
        group = []
        for batch in batches:
            group.append(batch)
            if len(group) == per_step:
                position.batches_in_epoch += per_step
                yield group
                group = []
                if position.step >= total:
                    return
        position.epoch, position.batches_in_epoch = position.epoch + 1, 0


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
