"""Supervised fine-tuning: next-token log-likelihood of the completions, token-weighted over the global batch."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from data import DataError, build_datasets, make_collator
from engine import lifecycle, loaders, models
from engine.config import RunConfig
from engine.logprobs import label_logprobs
from engine.loops import supervised
from losses import Objective


def train(cfg: RunConfig, accelerator: Accelerator, objective: Objective, loss_fn) -> lifecycle.RunResult:
    # 1. Tokenizer, tokenised rows (completion-only labels) and the policy.
    tokenizer = models.load_tokenizer(cfg.model)
    policy = models.load_policy(cfg.model, for_training=True,
                                disable_dropout=models.disables_dropout(cfg.model, "sft"))
    data = build_datasets("sft", cfg.data, tokenizer, log=accelerator.print,
                          report_dir=cfg.output_dir if accelerator.is_main_process else None)
    if objective.row_weights and "weight" not in data.train.column_names:
        raise DataError(f"objective {objective.name!r} weights each row by the data's 'weight' column, and "
                        f"data.path={cfg.data.path!r} has none; give every row a number 'weight' (a reward, say), "
                        "or train with objective.name=sft")
    collate = make_collator("sft", tokenizer, packing=cfg.data.packing)

    # 2. Loaders, optimizer and schedule, placed and sharded by Accelerate.
    run = supervised.setup(cfg, accelerator, policy, data.train, data.eval, collate, "sft")
    policy, eval_loader = run.model, run.eval_loader

    # 3. The forward, the loss of a micro-batch, and the evaluation.
    def forward(batch):
        # A packed batch has no attention mask: its position ids keep the sequences apart, with no cache.
        # The LM head runs only where a label is; `logits` are those K positions' (K, V) rows.
        logprobs, mask, logits = label_logprobs(policy, batch, return_logits=True)
        return logits, logprobs, mask

    def loss_on(batch):
        _, logprobs, mask = forward(batch)  # per-token log-probs of the labels
        if objective.row_weights:  # (B,) each row's weight, from the data's `weight` column
            return loss_fn(logprobs, mask, batch["weight"])
        return loss_fn(logprobs, mask)

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

    # 4. Resume, then optimizer steps, each micro-batch weighted by its share of the step's trained tokens
    # (all processes); log, evaluate and checkpoint on their schedules.
    logger = supervised.train_steps(cfg, accelerator, run, loss_on, evaluate=evaluate, desc="sft",
                                    units=lambda batch: (batch["labels"][:, 1:] != -100).sum(), sum_as="tokens")

    # 5. The final model (or adapter) and tokenizer in <output_dir>/final/.
    return lifecycle.save_final(accelerator, cfg, policy, tokenizer, logger, run.total)
