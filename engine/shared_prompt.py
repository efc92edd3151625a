"""Shared-prompt preference batches (`data.share_prompt`): whether a run can use them, the attention mask
a model takes, and a reward model's scores at the end of each response.

A shared batch (data.collators.share_prompt_batch) holds B pairs, each as prompt + chosen + rejected, in
R <= B rows (short pairs share a row, `data.share_prompt_row_tokens`) with an (R, 1, T, T) boolean attention
mask, and keeps the ordinary (2B, T') `labels` with `token_rows` and `token_positions` maps from the ordinary
layout into its rows; per-sequence results computed from it
(engine.logprobs.label_logprobs, `pair_scores` here) come back in the ordinary order, chosen then rejected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from data.config import DataConfig

SHARED_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take a custom 4D mask (flash attention takes only padding masks)."""


def is_shared(batch: Mapping) -> bool:
    return "token_positions" in batch


def use_shared_prompt(
    data_cfg: DataConfig, model, *, scores: bool = False, log: Callable[[str], None] = print
) -> bool:
    """True when `data.share_prompt` is on and `model` can run shared batches; when it is on but they cannot
    be used (attention other than sdpa or eager, packing, a sliding window shorter than data.max_length, a
    reward model with no `score` head), say why in one line and keep the ordinary layout. `scores`: the
    model is a reward model, read through its `score` head."""
    if not data_cfg.share_prompt:
        return False
    attention = attention_implementation(model)
    if data_cfg.packing:
        reason = "data.packing=true"
    elif attention not in SHARED_ATTENTION:
        reason = f"attention {attention!r} takes no custom mask; sdpa and eager do"
    elif (window := sliding_window(model)) is not None and window < data_cfg.max_length:
        reason = f"the model's sliding attention window ({window}) is shorter than data.max_length"
    elif scores and score_head(model) is None:
        reason = "the reward model has no `score` head to read per-token scores from"
    else:
        return True
    log(f"data.share_prompt: preference batches keep one row per sequence ({reason})")
    return False


def _unwrap(model):
    return getattr(model, "module", model)  # DDP, FSDP1 and DeepSpeed keep the model in `.module`


def attention_implementation(model) -> str | None:
    return getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)


def sliding_window(model) -> int | None:
    """The model's sliding attention window, if any layer uses one: transformers passes a custom 4D mask to
    sliding-window layers unchanged, so a shared batch is exact only for sequences within the window."""
    config = getattr(_unwrap(model), "config", None)
    window = getattr(config, "sliding_window", None)
    return window if window and getattr(config, "use_sliding_window", True) is not False else None


def model_attention_mask(model, batch: Mapping[str, Tensor]) -> Tensor | None:
    """`batch["attention_mask"]` as `model` takes it. transformers passes a 4D mask to attention as it is:
    sdpa reads a boolean one (True = attend), eager adds it to the scores, so for eager it becomes 0 where
    True and the dtype's minimum where False (as transformers' own eager masks)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 4 or attention_implementation(model) != "eager":
        return mask
    dtype = _unwrap(model).get_input_embeddings().weight.dtype
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, torch.finfo(dtype).min)


def score_head(model) -> torch.nn.Module | None:
    """The per-position score layer of a decoder's sequence-classification model (transformers names it
    `score`), under DDP/FSDP/DeepSpeed wrappers and peft (whose SEQ_CLS wrapper trains it as a module to
    save); None for a model without one, such as an encoder's `classifier`."""
    model = _unwrap(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    return head if isinstance(head, torch.nn.Module) else None


def pair_scores(model, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Rewards of a shared batch: (chosen (B,), rejected (B,)), each the score at its response's last token.

    The model runs its own forward (wrappers, hooks and peft untouched); a forward hook on the score head
    reads the (R, T, 1) scores of every position, where the model itself pools only each row's last one.
    """
    captured = []
    handle = score_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids=batch["input_ids"], attention_mask=model_attention_mask(model, batch),
              position_ids=batch["position_ids"], use_cache=False)
    finally:
        handle.remove()
    scores = captured[-1].squeeze(-1)  # (R, T)
    positions = batch["token_positions"]  # (2B, T'), -1 on padding
    last = positions.gather(1, (positions >= 0).sum(-1, keepdim=True) - 1).squeeze(1)
    return scores[batch["token_rows"], last].chunk(2)
