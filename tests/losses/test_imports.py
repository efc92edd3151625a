"""``import losses`` pulls in torch only, and every public name is importable and documented."""

import inspect
import subprocess
import sys

import losses

HEAVY = ("transformers", "peft", "accelerate", "datasets")

REQUIRED = [
    "dpo_loss",
    "ipo_loss",
    "hinge_loss",
    "orpo_loss",
    "pairwise_reward_loss",
    "kl_penalty",
    "kl_shaped_rewards",
    "masked_whiten",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "AdaptiveKLController",
    "FixedKLController",
    "sft_loss",
    "token_logprobs",
    "gather_logprobs",
    "entropy_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "Objective",
    "register",
    "get_objective",
    "bind_objective",
    "list_objectives",
    "clipped_policy_loss",
    "aggregate",
    "aggregation_unit",
    "aggregation_count",
    "get_advantage",
    "list_advantages",
    "register_advantage",
    "gae_advantages",
    "grpo_advantages",
    "dr_grpo_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "soft_overlong_penalty",
]


def test_import_losses_leaves_heavy_libraries_out():
    code = f"import sys, losses; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_public_names_are_exported_and_documented():
    assert set(REQUIRED) <= set(losses.__all__)
    for name in losses.__all__:
        obj = getattr(losses, name)
        assert inspect.getdoc(obj), name
    for name in [
        "dpo_loss",
        "ipo_loss",
        "hinge_loss",
        "orpo_loss",
        "pairwise_reward_loss",
        "ppo_policy_loss",
        "ppo_value_loss",
        "sft_loss",
        "gae",
        "kl_shaped_rewards",
        "masked_whiten",
        "clipped_policy_loss",
        "aggregate",
        "gae_advantages",
        "grpo_advantages",
        "dr_grpo_advantages",
        "rloo_advantages",
        "reinforce_pp_advantages",
        "soft_overlong_penalty",
    ]:
        doc = inspect.getdoc(getattr(losses, name))
        assert "Args:" in doc and "Returns:" in doc, name
