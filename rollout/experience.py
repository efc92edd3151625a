"""From sampled responses and their scores to an `Experience`: the tensors one PPO iteration trains on.

Shapes: B batch, P prompt length (left padded), R response length (right padded), T = P + R, V vocabulary.
Response position t (0-based) is the action a_t taken in state s_t = (prompt, a_0 .. a_{t-1}).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from rollout.generation import Generation
from rollout.logprobs import response_logprobs
from rollout.value_head import ActorCritic


@dataclass
class Experience:
    """One batch of rollouts. Tensors are masked: 0 wherever `action_mask` is False."""

    sequences: torch.Tensor  # (B, T) long: prompt left-padded to P, then the response right-padded to R
    attention_mask: torch.Tensor  # (B, T) bool: real prompt tokens and the response up to its first EOS
    action_mask: torch.Tensor  # (B, R) bool: response tokens that are actions (first EOS included);
    #                            all False for a row whose reward function failed (skipped, kept for shape)
    old_logprobs: torch.Tensor  # (B, R) log pi_old(a_t|s_t) of the rollout policy, logits / temperature
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(a_t|s_t) of the frozen reference, logits / temperature
    values: torch.Tensor  # (B, R) V(s_t) of the value function at rollout time
    scores: torch.Tensor  # (B,) the sequence-level reward: weighted sources, normalised and clipped,
    #                       minus the missing-EOS penalty; it lands on the last real response token
    no_eos: torch.Tensor  # (B,) bool: the response hit its length budget without an EOS
    rewards: torch.Tensor | None = None  # (B, R) per-token reward: -kl_coef * KL_t, plus the score at the last token
    advantages: torch.Tensor | None = None  # (B, R) GAE advantages A_t, whitened over action_mask
    returns: torch.Tensor | None = None  # (B, R) A_t + V(s_t) before whitening: the value target

    @property
    def response_length(self) -> torch.Tensor:
        """(B,) number of action tokens."""
        return self.action_mask.sum(-1)

    def select(self, index: torch.Tensor) -> Experience:
        """The rows in `index` (a minibatch)."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def to(self, device: torch.device | str) -> Experience:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


@contextlib.contextmanager
def _adapter_disabled(policy: nn.Module):
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("reference mode 'disabled' needs a peft policy (LoRA); give a frozen reference model")
    with policy.disable_adapter():
        yield


@torch.no_grad()
def make_experience(generation: Generation, scores: torch.Tensor, *, actor_critic: ActorCritic,
                    reference: nn.Module | None, temperature: float = 1.0, micro_batch_size: int = 8,
                    valid: torch.Tensor | None = None, with_values: bool = True,
                    with_reference: bool = True) -> Experience:
    """Log-probs of the rollout policy and of the reference, and values, `micro_batch_size` rows at a time.

    The rollout policy's log-probs come from `generation.logprobs` when the sampling pass kept them (and the
    values of a value head on the policy from `generation.values`); otherwise from a forward of the policy.
    Kept log-probs must have been sampled at `temperature`.

    Args:
        generation: output of `rollout.generation.generate`.
        scores: (B,) final sequence scores (see `rollout.scoring.Scorer`).
        actor_critic: the (unwrapped) policy and value function; run in eval mode.
        reference: the frozen reference model, or None for the policy with its adapter disabled.
        valid: (B,) bool, False for rows to leave out of training (their reward failed).
        with_values: False for an estimator without a value function: values are 0, and no value forward runs.
        with_reference: False when no KL is used: no reference forward; ref_logprobs are the rollout policy's,
            so every KL estimate is 0.
    """
    action_mask = generation.action_mask
    if valid is not None:
        action_mask = action_mask & valid.to(action_mask.device)[:, None]
    responses = generation.responses
    R = responses.shape[1]
    was_training = actor_critic.training
    actor_critic.eval()
    old, ref, values = [], [], []
    try:
        for i in range(0, responses.shape[0], micro_batch_size):
            rows = slice(i, i + micro_batch_size)
            seq, mask, act = generation.sequences[rows], generation.attention_mask[rows].long(), action_mask[rows]
            if generation.logprobs is None:
                out, v = actor_critic(seq, mask, act, temperature=temperature, with_values=with_values)
                old.append(out.logprobs)
                del out
            else:  # kept from the sampling pass: only the values may need a forward
                old.append(generation.logprobs[rows] * act)
                kept = actor_critic.critic is None and generation.values is not None
                v = None if not with_values else generation.values[rows] if kept else actor_critic.values(seq, mask, R)
            values.append(v * act if v is not None else torch.zeros_like(old[-1]))
            if not with_reference:
                ref.append(old[-1].clone())
            elif reference is None:
                with _adapter_disabled(actor_critic.policy):
                    ref.append(response_logprobs(actor_critic.policy, seq, mask, act, temperature=temperature))
            else:
                ref.append(response_logprobs(reference, seq, mask, act, temperature=temperature))
    finally:
        actor_critic.train(was_training)
    return Experience(
        sequences=generation.sequences,
        attention_mask=generation.attention_mask,
        action_mask=action_mask,
        old_logprobs=torch.cat(old),
        ref_logprobs=torch.cat(ref),
        values=torch.cat(values),
        scores=scores.to(values[0].device, torch.float32),
        no_eos=generation.no_eos,
    )

