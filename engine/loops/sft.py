"""Supervised fine-tuning: next-token log-likelihood of the completions, token-weighted over the global batch."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from data import build_datasets, make_collator
from engine import lifecycle, loaders, models, optim
from engine.config import RunConfig
from engine.logging import RunLogger
from engine.logprobs import label_logprobs
from engine.metrics import MeanMetrics
from losses import Objective


def train(cfg: RunConfig, accelerator: Accelerator, objective: Objective, loss_fn) -> lifecycle.RunResult:
    # 1. Tokenizer, tokenised rows (completion-only labels) and the policy.
    tokenizer = models.load_tokenizer(cfg.model)
    policy = models.load_policy(cfg.model, for_training=True,
                                disable_dropout=models.disables_dropout(cfg.model, "sft"))
    data = build_datasets("sft", cfg.data, tokenizer, log=accelerator.print,
                          report_dir=cfg.output_dir if accelerator.is_main_process else None)
    collate = make_collator("sft", tokenizer, packing=cfg.data.packing)

    # 2. Loaders, optimizer and schedule, placed and sharded by Accelerate.
    train_loader = loaders.train_loader(data.train, collate, cfg, "sft")
    eval_loader = loaders.eval_loader(data.eval, collate, cfg)
    optimizer = optim.build_optimizer(policy, cfg.optim)
    policy, optimizer, train_loader = accelerator.prepare(policy, optimizer, train_loader)
    eval_loader = accelerator.prepare(eval_loader) if eval_loader is not None else None
    total = loaders.total_steps(cfg, accelerator, train_loader)
    scheduler = accelerator.prepare(optim.build_scheduler(optimizer, cfg.optim, total))

    # 3. Resume: weights, optimizer, schedule, RNG states and the data position.
    position = lifecycle.resume(accelerator, cfg, [policy])
    logger = RunLogger.for_run(cfg, accelerator, total_steps=total, start_step=position.step, desc="sft")

    def forward(batch):
        # A packed batch has no attention mask: its position ids keep the sequences apart, with no cache.
        # The LM head runs only where a label is; `logits` are those K positions' (K, V) rows.
        logprobs, mask, logits = label_logprobs(policy, batch, return_logits=True)
        return logits, logprobs, mask

    def evaluate() -> dict[str, float]:
        policy.eval()
        sums = torch.zeros(3, device=accelerator.device)  # summed NLL, correct argmax tokens, tokens
        with torch.no_grad():
            for batch, counted in loaders.eval_batches(accelerator, eval_loader, cfg.eval.max_batches):
                logits, logprobs, mask = forward(batch)
                correct = torch.zeros_like(mask).masked_scatter(mask, logits.argmax(-1) == batch["labels"][:, 1:][mask])
                # the rows padding the last round, or a whole batch past eval.max_batches, count nothing
                repeats = slice(loaders.real_rows(accelerator, len(mask)) if counted else 0, None)
                mask[repeats], correct[repeats] = False, False
                sums += torch.stack([-(logprobs * mask).sum(), correct.sum(), mask.sum()]).float()
        policy.train()
        nll, correct, tokens = accelerator.reduce(sums, "sum").tolist()
        loss = nll / max(tokens, 1)
        return {"eval/loss": loss, "eval/token_accuracy": correct / max(tokens, 1), "eval/perplexity": math.exp(loss)}

    if eval_loader is not None and position.step == 0:
        logger.log(0, evaluate())  # where every eval curve starts

    # 4. Optimizer steps, each over `accumulation` micro-batches.
    policy.train()
    for micro_batches in loaders.optimizer_steps(accelerator, train_loader, position, total):
        # 4a. Weight each micro-batch by its share of the step's trained tokens (all processes).
        shares = optim.loss_shares(accelerator, [(b["labels"][:, 1:] != -100).sum() for b in micro_batches])
        step_metrics, tokens = MeanMetrics(), []
        for batch, share in zip(micro_batches, shares):
            with accelerator.accumulate(policy):
                # 4b. Forward, per-token log-probs of the labels, the objective.
                _, logprobs, mask = forward(batch)
                loss, metrics = loss_fn(logprobs, mask)
                # 4c. Backward; gradients are synced across processes on the last micro-batch only.
                accelerator.backward(loss * share)
                if accelerator.sync_gradients:
                    step_info = optim.optimizer_step(accelerator, policy, optimizer, scheduler, cfg.optim.max_grad_norm)
            step_metrics.add({"loss": loss, **metrics}, mask.sum())
            tokens.append(mask.sum())

        # 5. Log, evaluate and checkpoint on their schedules.
        position.step += 1
        metrics = step_metrics.compute(accelerator)
        metrics.update({k: float(v) for k, v in step_info.items()}, tokens=float(accelerator.reduce(sum(tokens), "sum")))
        lifecycle.after_step(accelerator, cfg, logger, position, total, metrics,
                          evaluate if eval_loader is not None else None)

    # 6. The final model (or adapter) and tokenizer in <output_dir>/final/.
    return lifecycle.save_final(accelerator, cfg, policy, tokenizer, logger, total)
