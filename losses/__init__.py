"""The objective library: pure functions of tensors, importing torch only.

Shapes: B batch, T full sequence, R response length, V vocabulary. ``*_logprobs`` are per token,
(B, T) or (B, R); ``*_logps`` are per sequence, (B,). Masks are named ``*_mask``, may be bool or 0/1,
and True means "this position counts".

Conventions shared by every function:

- Masked positions may hold any finite junk; it is replaced with ``torch.where`` before any
  arithmetic (before ``exp`` in particular), so it reaches neither a result nor a gradient.
- fp16/bf16/fp32 inputs are computed in fp32; float64 inputs stay float64.
- Every objective returns ``(loss, metrics)``: a scalar tensor and a dict of detached scalar
  tensors with namespaced keys (no ``.item()``, which would force a device sync).
- Means over tokens are token-weighted over the whole batch; to accumulate micro-batches, weight
  each micro-batch loss by its share of the batch's valid tokens.

Objectives are registered by name (``list_objectives()``); ``bind_objective(name, kwargs)`` checks
config arguments against the signature, and ``"package.module:function"`` names one from elsewhere.
"""

from .advantages import gae
from .dpo import dpo_loss, hinge_loss, ipo_loss, preference_metrics
from .kl import AdaptiveKLController, FixedKLController, kl_penalty, kl_shaped_rewards
from .logprobs import (
    entropy_from_logits,
    gather_logprobs,
    reduce_logprobs,
    sequence_sums,
    split_pairs,
    token_logprobs,
)
from .masking import as_bool_mask, masked_mean, masked_sum, masked_var, masked_whiten, upcast
from .orpo import log1m_exp, orpo_loss
from .ppo import ppo_policy_loss, ppo_value_loss
from .registry import (
    LOGPS_REDUCTIONS,
    Objective,
    Range,
    bind_objective,
    get_objective,
    list_objectives,
    register,
)
from .reward import pairwise_reward_loss
from .sft import sft_loss

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "LOGPS_REDUCTIONS",
    "Objective",
    "Range",
    "as_bool_mask",
    "bind_objective",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "gather_logprobs",
    "get_objective",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty",
    "kl_shaped_rewards",
    "list_objectives",
    "log1m_exp",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "orpo_loss",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_metrics",
    "reduce_logprobs",
    "register",
    "sequence_sums",
    "sft_loss",
    "split_pairs",
    "token_logprobs",
    "upcast",
]
