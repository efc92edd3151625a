"""The objective registry: names, families, defaults, binding config kwargs, external objectives."""

import functools
import inspect

import pytest
import torch

import losses
from losses import Objective, bind_objective, get_objective, list_objectives, register

BUILTIN = {
    "sft": ("sft", False),
    "reward_weighted_sft": ("sft", False),
    "reward": ("reward", False),
    "dpo": ("pairwise", True),
    "cdpo": ("pairwise", True),
    "soft_dpo": ("pairwise", True),
    "soft_reward": ("reward", False),
    "ipo": ("pairwise", True),
    "hinge": ("pairwise", True),
    "orpo": ("pairwise", False),
    "ppo": ("ppo", True),
    "grpo": ("ppo", True),
    "dr_grpo": ("ppo", False),
    "dapo": ("ppo", False),
    "gspo": ("ppo", False),
    "rloo": ("ppo", True),
    "reinforce_pp": ("ppo", True),
}


@register("test_mean_margin", family="pairwise", defaults={"scale": 2.0})
def mean_margin_objective(
    chosen_logprobs, chosen_mask, rejected_logprobs, rejected_mask, *, scale, offset=0.0
):
    """A reference-free objective from outside the library: scale * (mean rejected - mean chosen) + offset."""
    chosen = losses.masked_mean(chosen_logprobs, chosen_mask)
    rejected = losses.masked_mean(rejected_logprobs, rejected_mask)
    loss = scale * (rejected - chosen) + offset
    return loss, {"loss/margin": loss.detach()}


def not_registered(logprobs, mask):
    return logprobs.sum(), {}


def test_builtin_names_families_and_reference():
    builtin = {o.name: o for o in list_objectives() if o.fn.__module__.startswith("losses.")}
    assert set(builtin) == set(BUILTIN)
    for name, (family, needs_reference) in BUILTIN.items():
        objective = get_objective(name)
        assert objective is builtin[name]
        assert (objective.family, objective.needs_reference) == (family, needs_reference), name
    assert get_objective("dpo").fn is losses.dpo_loss and get_objective("cdpo").fn is losses.dpo_loss
    assert dict(get_objective("cdpo").defaults) == {"label_smoothing": 0.1}
    assert dict(get_objective("dpo").defaults) == {}
    assert get_objective("ipo").logps_reduction == "mean"
    assert get_objective("dpo").logps_reduction == "sum"
    assert [o.name for o in list_objectives()] == sorted(o.name for o in list_objectives())


@pytest.mark.parametrize(
    "family,positional",
    [
        ("sft", ["logprobs", "mask"]),
        ("reward", ["chosen_rewards", "rejected_rewards"]),
        ("ppo", ["logprobs", "old_logprobs", "advantages", "mask"]),
    ],
)
def test_family_call_conventions(family, positional):
    for objective in list_objectives():
        if objective.family == family and objective.fn.__module__.startswith("losses."):
            params = inspect.signature(objective.fn).parameters.values()
            # an sft objective with row weights takes the data's (B,) weight column third
            expected = [*positional, "weights"] if objective.row_weights else positional
            assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == expected, objective.name


def test_pairwise_call_conventions():
    with_reference = [
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
    ]
    without = ["chosen_logprobs", "chosen_mask", "rejected_logprobs", "rejected_mask"]
    for objective in list_objectives():
        if objective.family == "pairwise":
            params = inspect.signature(objective.fn).parameters.values()
            names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
            assert names == (with_reference if objective.needs_reference else without), objective.name


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(ValueError, match="did you mean 'dpo'"):
        get_objective("dop")
    with pytest.raises(ValueError, match="did you mean 'orpo'"):
        get_objective("ORPO")


def test_bind_checks_kwargs_before_any_model_loads():
    with pytest.raises(ValueError, match="'betta'.*did you mean 'beta'"):
        bind_objective("dpo", {"betta": 0.1})
    with pytest.raises(ValueError, match="'label_smothing'.*did you mean 'label_smoothing'"):
        bind_objective("cdpo", {"beta": 0.1, "label_smothing": 0.2})
    with pytest.raises(ValueError, match="needs keyword argument.*'beta'"):
        bind_objective("ipo", {})
    with pytest.raises(ValueError, match="'policy_chosen_logps'"):
        bind_objective("dpo", {"beta": 0.1, "policy_chosen_logps": 1.0})


def test_bind_applies_defaults_then_user_kwargs():
    pairs = [
        torch.tensor([-1.0, -3.0]),
        torch.tensor([-2.0, -1.0]),
        torch.tensor([-1.5, -2.0]),
        torch.tensor([-1.5, -2.0]),
    ]
    objective, fn = bind_objective("cdpo", {"beta": 0.5})
    assert objective.name == "cdpo" and isinstance(fn, functools.partial)
    assert fn.keywords == {"label_smoothing": 0.1, "beta": 0.5}
    torch.testing.assert_close(fn(*pairs)[0], losses.dpo_loss(*pairs, beta=0.5, label_smoothing=0.1)[0])
    _, fn = bind_objective("cdpo", {"beta": 0.5, "label_smoothing": 0.0})
    torch.testing.assert_close(fn(*pairs)[0], losses.dpo_loss(*pairs, beta=0.5)[0])
    objective, fn = bind_objective(get_objective("ppo"), {"clip_coef": 0.2})
    assert objective.name == "ppo" and fn.keywords == {"clip_coef": 0.2}


def test_external_objective_by_module_path():
    path = f"{__name__}:mean_margin_objective"
    objective = get_objective(path)
    assert objective.fn is mean_margin_objective
    assert (objective.name, objective.family, objective.needs_reference) == (
        "test_mean_margin",
        "pairwise",
        False,
    )
    objective, fn = bind_objective(path, {"offset": 1.0})
    chosen = torch.tensor([[-1.0, -3.0]])
    rejected = torch.tensor([[-4.0, -1000.0]])
    mask = torch.tensor([[True, True]])
    loss, _ = fn(chosen, mask, rejected, torch.tensor([[True, False]]))
    assert loss.item() == 2.0 * (-4.0 - -2.0) + 1.0
    with pytest.raises(ValueError, match="did you mean 'scale'"):
        bind_objective(path, {"scael": 1.0})
    assert get_objective("test_mean_margin") is objective
    assert get_objective("losses.dpo:dpo_loss").name == "dpo"


def test_external_path_errors_are_clear():
    with pytest.raises(ValueError, match="cannot import module 'no_such_package.mod'"):
        get_objective("no_such_package.mod:fn")
    with pytest.raises(ValueError, match="did you mean 'mean_margin_objective'"):
        get_objective(f"{__name__}:mean_margin_objectiv")
    with pytest.raises(ValueError, match="not registered.*register"):
        get_objective(f"{__name__}:not_registered")


def test_register_validates_its_arguments():
    with pytest.raises(ValueError, match="family"):
        register("test_bad_family", family="rl")(not_registered)
    with pytest.raises(ValueError, match="logps_reduction"):
        register("test_bad_reduction", family="pairwise", logps_reduction="max")(not_registered)
    with pytest.raises(ValueError, match="did you mean 'beta'"):
        register("test_bad_default", family="pairwise", defaults={"betaa": 1.0})(losses.dpo_loss)
    with pytest.raises(ValueError, match="already registered"):
        register("dpo", family="sft")(not_registered)
    assert "test_bad_family" not in {o.name for o in list_objectives()}
    assert not hasattr(not_registered, "__objective__")


def test_objective_is_frozen():
    objective = get_objective("cdpo")
    with pytest.raises(AttributeError):
        objective.name = "other"
    with pytest.raises(TypeError):
        objective.defaults["label_smoothing"] = 0.5
    assert isinstance(objective, Objective)
    assert len({objective, get_objective("cdpo"), get_objective("dpo")}) == 2
