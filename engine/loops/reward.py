"""Reward models: a scalar head scored on each chosen and rejected sequence, trained on the pair (Bradley-Terry)."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from data import build_datasets, make_collator
from engine import lifecycle, loaders, models
from engine.config import RunConfig
from engine.loops import supervised
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
    fields = supervised.pair_columns(cfg, objective, data)  # margin, and soft_label where the objective reads it

    # 2. Loaders, optimizer and schedule, placed and sharded by Accelerate.
    run = supervised.setup(cfg, accelerator, model, data.train, data.eval, collate, "preference")
    model, eval_loader = run.model, run.eval_loader

    # 3. The scores of a batch's pairs, the loss of a micro-batch, and the evaluation.
    def scores(batch) -> tuple[torch.Tensor, torch.Tensor]:
        if is_shared(batch):
            return pair_scores(model, batch)
        # One forward over the (2B, T) batch: rows [0, B) are the chosen sequences, [B, 2B) the rejected.
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        return rewards.chunk(2)

    def loss_on(batch):
        # Score chosen and rejected in one forward; the objective on the pair of scores.
        chosen, rejected = scores(batch)
        return loss_fn(chosen, rejected, **{key: batch.get(key) for key in fields})

    def evaluate() -> dict[str, float]:
        model.eval()
        chosen, rejected, columns = [], [], {key: [] for key in fields}
        with torch.no_grad():
            for batch, counted in loaders.eval_batches(accelerator, eval_loader, cfg.eval.max_batches):
                c, r = scores(batch)
                # gathered batch by batch, keeping only the rows that count: not the repeats that pad the
                # last round, nor a batch past eval.max_batches
                rows = loaders.real_rows(accelerator, len(c)) if counted else 0
                keep = accelerator.gather((torch.arange(len(c), device=c.device) < rows).int()).bool()
                chosen.append(accelerator.gather(c)[keep])
                rejected.append(accelerator.gather(r)[keep])
                for key, values in columns.items():  # a margin the data lacks is 0; a soft label it needs is there
                    values.append(accelerator.gather(batch[key] if key in batch else torch.zeros_like(c))[keep])
        model.train()
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        loss, metrics = loss_fn(chosen, rejected, **{key: torch.cat(values) for key, values in columns.items()})
        return {"eval/loss": loss.item(), **{f"eval/{k}": v.item() for k, v in metrics.items()}}

    # 4. Resume, then optimizer steps, each micro-batch of pairs weighted by its share of the step's pairs (all
    # processes); log, evaluate and checkpoint on their schedules.
    logger = supervised.train_steps(cfg, accelerator, run, loss_on, evaluate=evaluate, desc="reward",
                                    units=lambda batch: len(batch["labels"]) // 2)

    # 5. The final model (or adapter) and tokenizer in <output_dir>/final/.
    return lifecycle.save_final(accelerator, cfg, model, tokenizer, logger, run.total)
