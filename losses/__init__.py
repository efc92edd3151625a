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
Advantage estimators are registered the same way (``list_advantages()``, ``get_advantage(name)``), each
declaring whether it needs a critic and whether the loop whitens its output; a ppo-family objective names
the estimator it goes with (``Objective.advantage``). Losses aggregated per sequence are accumulated over
micro-batches by each one's share of the sequences instead (``aggregation_unit``, ``aggregation_count``).
"""

from .advantages import (
    Estimator,
    dr_grpo_advantages,
    gae,
    gae_advantages,
    get_advantage,
    grpo_advantages,
    list_advantages,
    register_advantage,
    reinforce_pp_advantages,
    rloo_advantages,
)
from .dpo import dpo_loss, hinge_loss, ipo_loss, preference_metrics, soft_dpo_loss
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
from .policy import aggregate, aggregation_count, aggregation_unit, clipped_policy_loss
from .ppo import ppo_policy_loss, ppo_value_loss
from .registry import (
    LOGPS_REDUCTIONS,
    PAIR_FIELDS,
    Objective,
    Range,
    bind_objective,
    get_objective,
    list_objectives,
    pair_fields,
    register,
)
from .reward import pairwise_reward_loss, soft_preference_nll, soft_reward_loss
from .sft import reward_weighted_sft_loss, sft_loss
from .shaping import soft_overlong_penalty

__all__ = [
    "AdaptiveKLController",
    "Estimator",
    "FixedKLController",
    "LOGPS_REDUCTIONS",
    "PAIR_FIELDS",
    "Objective",
    "Range",
    "aggregate",
    "aggregation_count",
    "aggregation_unit",
    "as_bool_mask",
    "bind_objective",
    "clipped_policy_loss",
    "dpo_loss",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "gae",
    "gae_advantages",
    "gather_logprobs",
    "get_advantage",
    "get_objective",
    "grpo_advantages",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty",
    "kl_shaped_rewards",
    "list_advantages",
    "list_objectives",
    "log1m_exp",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "orpo_loss",
    "pair_fields",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "preference_metrics",
    "reduce_logprobs",
    "register",
    "register_advantage",
    "reinforce_pp_advantages",
    "reward_weighted_sft_loss",
    "rloo_advantages",
    "sequence_sums",
    "sft_loss",
    "soft_dpo_loss",
    "soft_overlong_penalty",
    "soft_preference_nll",
    "soft_reward_loss",
    "split_pairs",
    "token_logprobs",
    "upcast",
]
