"""The value function V(s_t): a scalar head on a transformer's last hidden state.

By default the head sits on the policy itself (shared backbone, one forward gives logits and values,
as in lm-human-preferences); a separate critic model is the option for when the policy's features
should not be pulled by the value loss. `ActorCritic` holds both as one module, so one
`accelerator.prepare` and one optimizer cover the policy (or its adapter), the head and the critic.

Shapes: B batch, T = P + R (left-padded prompt, right-padded response), R response length, H hidden, V vocab.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rollout.generation import position_ids_from_mask
from rollout.logprobs import ResponseOutput, response_forward

VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_DIR = "critic"


class ValueHead(nn.Module):
    """v = w . h + b, read from the final (normed) hidden state; kept in float32 whatever the backbone dtype."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.summary = nn.Linear(hidden_size, 1)
        # zero init, as lm-human-preferences' value head (layer_init std=0 in lm-human-preference-details):
        # the first advantages are then the rewards themselves, not the noise of a random head
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...)"""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class ActorCritic(nn.Module):
    """The policy and its value function: `forward` gives the response log-probs and logits, and values (B, R).

    Position t of the response (0-based) reads the state before token t was chosen: logits and hidden
    state at sequence position P + t - 1. Only those R positions go through the LM head.
    """

    def __init__(self, policy: nn.Module, value_head: ValueHead | None = None, critic: nn.Module | None = None,
                 *, with_value_head: bool = True):
        super().__init__()
        self.policy = policy
        self.critic = critic
        hidden = (critic or policy).config.hidden_size
        if not with_value_head:  # a critic-free estimator (GRPO, RLOO, ...): the policy alone
            if value_head is not None or critic is not None:
                raise ValueError("with_value_head=False takes neither a value head nor a critic")
            self.value_head = None
            self._critic_logits_to_keep = False
            return
        self.value_head = value_head if value_head is not None else ValueHead(hidden)
        if self.value_head.hidden_size != hidden:
            raise ValueError(f"value head expects hidden size {self.value_head.hidden_size}, the backbone has {hidden}")
        self._critic_logits_to_keep = critic is not None and _accepts_logits_to_keep(critic)

    def forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor,
                *, temperature: float = 1.0, with_values: bool = True) -> tuple[ResponseOutput, torch.Tensor | None]:
        """Args: sequences (B, T), attention_mask (B, T), action_mask (B, R), the sampling temperature.
        Returns: the policy's `rollout.logprobs.ResponseOutput` (log-probs (B, R), logits (B, R, V) / temperature)
        and values (B, R) float32, or None without `with_values`."""
        if with_values and self.value_head is None:
            raise ValueError("this ActorCritic has no value function (with_value_head=False)")
        shared = with_values and self.critic is None
        out = response_forward(self.policy, sequences, attention_mask, action_mask, temperature=temperature,
                               hidden=shared)
        if not with_values:
            return out, None
        if shared:
            return out._replace(hidden=None), self.value_head(out.hidden)
        return out, self.values(sequences, attention_mask.long(), action_mask.shape[1])

    def values(self, sequences: torch.Tensor, attention_mask: torch.Tensor, response_length: int
               ) -> torch.Tensor:
        """(B, R) values alone: the critic's forward, or the policy's trunk with its LM head at one position."""
        backbone = self.critic if self.critic is not None else self.policy
        keep = self._critic_logits_to_keep if self.critic is not None else True
        hidden = backbone(input_ids=sequences, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), output_hidden_states=True,
                          use_cache=False, **({"logits_to_keep": 1} if keep else {})).hidden_states[-1]
        return self.value_head(hidden[:, -response_length - 1:-1])


def save_value_head(head: ValueHead, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write the head next to the policy weights or adapter as `value_head.safetensors`. `state_dict` is
    written instead of `head.state_dict()` when given: the gathered full tensors of sharded weights."""
    path = Path(out_dir) / VALUE_HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = head.state_dict() if state_dict is None else state_dict
    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    save_file(tensors, str(path), metadata={"hidden_size": json.dumps(head.hidden_size)})
    return path


def load_value_head(path: str | Path) -> ValueHead:
    """Read a head written by `save_value_head`; `path` is the file or the directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / VALUE_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no value head at {path}")
    tensors = load_file(str(path))
    head = ValueHead(tensors["summary.weight"].shape[1])
    head.load_state_dict(tensors)
    return head

