"""Pairwise preference objectives (DPO and its variants, ORPO, your own): chosen and rejected responses scored
by the policy in one forward (each prompt once when it is shared, data.share_prompt), against a frozen
reference when the objective needs one."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from data import build_datasets, make_collator
from engine import lifecycle, loaders, models
from engine.config import ConfigError, RunConfig, to_dict
from engine.logprobs import label_logprobs
from engine.loops import supervised
from engine.metrics import MeanMetrics
from engine.reference import add_row_index, make_reference
from engine.shared_prompt import use_shared_prompt
from losses import Objective, reduce_logprobs, split_pairs


def train(cfg: RunConfig, accelerator: Accelerator, objective: Objective, loss_fn) -> lifecycle.RunResult:
    # 1. Tokenizer, policy and pairs; `row_index` lets a precomputed reference find each pair's log-probs.
    tokenizer = models.load_tokenizer(cfg.model)
    policy = models.load_policy(cfg.model, for_training=True,
                                disable_dropout=models.disables_dropout(cfg.model, "pairwise"))
    data = build_datasets("preference", cfg.data, tokenizer, log=accelerator.print,
                          report_dir=cfg.output_dir if accelerator.is_main_process else None)
    train_rows = add_row_index(data.train)
    eval_rows = add_row_index(data.eval) if data.eval is not None and len(data.eval) else None
    # Labels mark every response token, EOS included, so a pad token equal to EOS is harmless here. With
    # data.share_prompt a batch holds each prompt once (short pairs share a row); its labels keep the 2B rows.
    share = use_shared_prompt(cfg.data, policy, log=accelerator.print)
    collate = with_row_index(make_collator("preference", tokenizer, allow_pad_as_eos=True, share_prompt=share,
                                           share_row_tokens=cfg.data.share_prompt_row_tokens))
    fields = supervised.pair_columns(cfg, objective, data)  # soft_label, where the objective reads it

    # 2. Loaders, optimizer and schedule, placed and sharded by Accelerate.
    run = supervised.setup(cfg, accelerator, policy, train_rows, eval_rows, collate, "preference")
    policy, eval_loader = run.model, run.eval_loader

    # 3. The reference (a frozen copy, the policy with its adapter off, or log-probs computed once now).
    reference = None
    if objective.needs_reference:
        reference = make_reference(cfg.reference, cfg.model, policy)
        own_model = getattr(reference, "model", None)
        if share and own_model is not None and own_model is not policy:  # a frozen copy, maybe of another model
            why: list[str] = []
            if not use_shared_prompt(cfg.data, own_model, log=why.append):
                raise ConfigError(f"the reference model cannot read shared-prompt batches: {why[0]}; "
                                  "set data.share_prompt=false")
        splits = {"train": train_rows} | ({"eval": eval_rows} if eval_loader is not None else {})
        for split, rows in splits.items():
            reference.precompute(rows, collate, batch_size=cfg.batch.eval_batch_size or cfg.batch.micro_batch_size,
                                 split=split, extra_key=to_dict(cfg.data))

    # 4. The loss of a (micro-)batch and the evaluation.
    def loss_on(batch, split: str = "train", pairs: int | None = None):
        # One forward over the batch; the log-probs' rows [0, B) are the chosen sequences, [B, 2B) the
        # rejected (shared-prompt batches included); the objective on the first `pairs` pairs (all when None).
        keep = slice(pairs)
        per_pair = {key: batch[key][keep] if key in batch else None for key in fields}
        logprobs, mask = label_logprobs(policy, batch)
        if reference is not None:
            ref_chosen, ref_rejected = reference.logps(batch, reduction=objective.logps_reduction, split=split)
            chosen, rejected = split_pairs(reduce_logprobs(logprobs, mask, objective.logps_reduction))
            return loss_fn(chosen[keep], rejected[keep], ref_chosen[keep], ref_rejected[keep], **per_pair)
        (chosen, rejected), (chosen_mask, rejected_mask) = split_pairs(logprobs), split_pairs(mask)
        return loss_fn(chosen[keep], chosen_mask[keep], rejected[keep], rejected_mask[keep], **per_pair)

    def evaluate() -> dict[str, float]:
        policy.eval()
        means = MeanMetrics()
        with torch.no_grad():
            for batch, counted in loaders.eval_batches(accelerator, eval_loader, cfg.eval.max_batches):
                # the repeats that pad the last round, and a batch past eval.max_batches, weigh nothing (one
                # pair is scored so every metric key exists)
                pairs = loaders.real_rows(accelerator, len(batch["labels"]) // 2) if counted else 0
                loss, metrics = loss_on(batch, "eval", max(pairs, 1))
                means.add({"loss": loss, **metrics}, pairs)
        policy.train()
        return {f"eval/{key}": value for key, value in means.compute(accelerator).items()}

    # 5. Resume, then optimizer steps, each micro-batch of pairs weighted by its share of the step's pairs (all
    # processes): policy log-probs of both responses, reference log-probs, the objective; log, evaluate and
    # checkpoint on their schedules.
    logger = supervised.train_steps(cfg, accelerator, run, loss_on, evaluate=evaluate, desc=objective.name,
                                    units=lambda batch: len(batch["labels"]) // 2)

    # 6. The final model (or adapter) and tokenizer in <output_dir>/final/.
    return lifecycle.save_final(accelerator, cfg, policy, tokenizer, logger, run.total)


def with_row_index(collate):
    """The preference collator, passing each pair's `row_index` through as a (B,) tensor."""

    def collate_rows(rows: list[dict]) -> dict:
        batch = collate([{k: v for k, v in row.items() if k != "row_index"} for row in rows])
        if rows and "row_index" in rows[0]:
            batch["row_index"] = torch.tensor([row["row_index"] for row in rows])
        return batch

    return collate_rows
