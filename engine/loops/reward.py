"""Reward models: a scalar head scored on each chosen and rejected sequence, trained on the pair (Bradley-Terry)."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from data import build_datasets, make_collator
from engine import lifecycle, loaders, models, optim
from engine.config import RunConfig
from engine.logging import RunLogger
from engine.metrics import MeanMetrics
from engine.shared_prompt import is_shared, pair_scores, use_shared_prompt
from losses import Objective


def train(cfg: RunConfig, accelerator: Accelerator, objective: Objective, loss_fn) -> lifecycle.RunResult:
    # 1. Tokenizer (it must have a pad token: the score is read at the last non-pad token), pairs, model.
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_reward_model(cfg.model, num_labels=1, for_training=True,
                                     disable_dropout=models.disables_dropout(cfg.model, "reward"))
    data = build_datasets("preference", cfg.data, tokenizer, log=accelerator.print,
                          report_dir=cfg.output_dir if accelerator.is_main_process else None)
    # With data.share_prompt a batch holds each prompt once (short pairs share a row); its labels keep the 2B rows.
    share = use_shared_prompt(cfg.data, model, scores=True, log=accelerator.print)
    collate = make_collator("preference", tokenizer, share_prompt=share,
                            share_row_tokens=cfg.data.share_prompt_row_tokens)

    # 2. Loaders, optimizer and schedule, placed and sharded by Accelerate.
    train_loader = loaders.train_loader(data.train, collate, cfg, "preference")
    eval_loader = loaders.eval_loader(data.eval, collate, cfg)
    optimizer = optim.build_optimizer(model, cfg.optim)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loader = accelerator.prepare(eval_loader) if eval_loader is not None else None
    total = loaders.total_steps(cfg, accelerator, train_loader)
    scheduler = accelerator.prepare(optim.build_scheduler(optimizer, cfg.optim, total))

    # 3. Resume: weights, optimizer, schedule, RNG states and the data position.
    position = lifecycle.resume(accelerator, cfg, [model])
    logger = RunLogger.for_run(cfg, accelerator, total_steps=total, start_step=position.step, desc="reward")

    def scores(batch) -> tuple[torch.Tensor, torch.Tensor]:
        if is_shared(batch):
            return pair_scores(model, batch)
        # One forward over the (2B, T) batch: rows [0, B) are the chosen sequences, [B, 2B) the rejected.
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        return rewards.chunk(2)

    def evaluate() -> dict[str, float]:
        model.eval()
        chosen, rejected, margins = [], [], []
        with torch.no_grad():
            for batch, counted in loaders.eval_batches(accelerator, eval_loader, cfg.eval.max_batches):
                c, r = scores(batch)
                # gathered batch by batch, keeping only the rows that count: not the repeats that pad the
                # last round, nor a batch past eval.max_batches
                rows = loaders.real_rows(accelerator, len(c)) if counted else 0
                keep = accelerator.gather((torch.arange(len(c), device=c.device) < rows).int()).bool()
                chosen.append(accelerator.gather(c)[keep])
                rejected.append(accelerator.gather(r)[keep])
                margins.append(accelerator.gather(batch["margin"] if "margin" in batch else torch.zeros_like(c))[keep])
        model.train()
        chosen, rejected, margin = (torch.cat(x) for x in (chosen, rejected, margins))
        loss, metrics = loss_fn(chosen, rejected, margin=margin)
        return {"eval/loss": loss.item(), **{f"eval/{k}": v.item() for k, v in metrics.items()}}

    if eval_loader is not None and position.step == 0:
        logger.log(0, evaluate())  # where every eval curve starts

    # 4. Optimizer steps, each over `accumulation` micro-batches of pairs.
    model.train()
    for micro_batches in loaders.optimizer_steps(accelerator, train_loader, position, total):
        shares = optim.loss_shares(accelerator, [len(b["labels"]) // 2 for b in micro_batches])
        step_metrics = MeanMetrics()
        for batch, share in zip(micro_batches, shares):
            with accelerator.accumulate(model):
                # 4a. Score chosen and rejected in one forward; the objective on the pair of scores.
                chosen, rejected = scores(batch)
                loss, metrics = loss_fn(chosen, rejected, margin=batch.get("margin"))
                # 4b. Backward; gradients are synced across processes on the last micro-batch only.
                accelerator.backward(loss * share)
                if accelerator.sync_gradients:
                    step_info = optim.optimizer_step(accelerator, model, optimizer, scheduler, cfg.optim.max_grad_norm)
            step_metrics.add({"loss": loss, **metrics}, len(chosen))

        # 5. Log, evaluate and checkpoint on their schedules.
        position.step += 1
        metrics = step_metrics.compute(accelerator) | {k: float(v) for k, v in step_info.items()}
        lifecycle.after_step(accelerator, cfg, logger, position, total, metrics,
                          evaluate if eval_loader is not None else None)

    # 6. The final model (or adapter) and tokenizer in <output_dir>/final/.
    return lifecycle.save_final(accelerator, cfg, model, tokenizer, logger, total)
