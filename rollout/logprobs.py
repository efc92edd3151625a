"""Log-probs of sampled responses under a causal LM: the one forward every online caller shares.

A rollout row is a left-padded prompt followed by a right-padded response, (B, T) with T = P + R. Response
token t (0-based) is predicted by the logits at sequence position P + t - 1, so a forward keeps the last
R + 1 positions (`logits_to_keep`) and drops the last one: only R positions go through the LM head. The
position ids come from the attention mask, so a left-padded prompt is placed as it was when sampled.

The log-probs are those of logits / temperature, the distribution the tokens were drawn from (as
lm-human-preferences), before top-k, top-p or an EOS ban; the rollout policy, the policy being trained
and the reference are all scored this way. Labelled training batches (SFT, the pairwise objectives) go
through `engine.logprobs.label_logprobs` instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from losses import gather_logprobs
from rollout.generation import position_ids_from_mask


class ResponseOutput(NamedTuple):
    logprobs: torch.Tensor  # (B, R) fp32 log pi(a_t | s_t) under logits / temperature, 0 off the action mask
    logits: torch.Tensor  # (B, R, V) those logits, divided by the temperature, in the model's dtype
    hidden: torch.Tensor | None  # (B, R, H) the last hidden state at the same positions, when asked for


def response_forward(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                     action_mask: torch.Tensor, *, temperature: float = 1.0, hidden: bool = False) -> ResponseOutput:
    """One forward of `model` over rollout rows: the response tokens' log-probs, their logits and, with
    `hidden=True`, the hidden states a value head reads.

    Args:
        sequences: (B, T) prompt then response token ids; the last R = action_mask.shape[1] are the response.
        attention_mask: (B, T) 1 on real tokens.
        action_mask: (B, R) True on the response tokens that count.
        temperature: the sampling temperature; the logits are divided by it (0 and 1 leave them as they are).
    """
    R = action_mask.shape[1]
    attention_mask = attention_mask.long()
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                logits_to_keep=R + 1, output_hidden_states=hidden, use_cache=False)
    logits = out.logits[:, :-1]
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    logprobs = gather_logprobs(logits, sequences[:, -R:]) * action_mask
    return ResponseOutput(logprobs, logits, out.hidden_states[-1][:, -R - 1:-1] if hidden else None)


def response_logprobs(model: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      action_mask: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """(B, R) log-probs of the response tokens under `model`: `response_forward(...).logprobs`."""
    return response_forward(model, sequences, attention_mask, action_mask, temperature=temperature).logprobs
