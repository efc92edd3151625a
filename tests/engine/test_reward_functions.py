"""A reward function that is misnamed, returns bad values, hangs or fails on most rows stops a PPO run with
exit 2 and a message naming it (and the rows and values), never a traceback or exit 1 ("diverged")."""

from __future__ import annotations

import pytest

from tests.engine.runs import run_cli

FIXTURE = "tests.rollout.rewards_fixture"
# one PPO iteration of 8 prompts and 4 new tokens on the random tiny model
ONE_ITERATION = ["model.name_or_path=tiny", "max_steps=1", "ppo.rollout_batch_size=8", "ppo.rollout_micro_batch_size=8",
                 "ppo.max_new_tokens=4", "checkpoint.every_steps=0", "ppo.missing_eos_penalty=null"]


def rewards(function: str, **extra) -> str:
    more = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"ppo.rewards=[{{name: mine, function: '{function}'{more}}}]"


def stopped(tmp_path, *overrides: str) -> str:
    code, stderr = run_cli("ppo.yaml", tmp_path / "run", *ONE_ITERATION, *overrides)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    return stderr


@pytest.mark.parametrize("function, message", [
    (f"{FIXTURE}:length_rewrd", f"ppo.rewards[0].function ('mine'): reward function '{FIXTURE}:length_rewrd': "
                                f"module '{FIXTURE}' has no callable 'length_rewrd'"),
    ("tests.rollout.no_such_module:f", "cannot import module 'tests.rollout.no_such_module'"),
    (f"{FIXTURE}.length_reward", "must be written 'package.module:function'"),
])
def test_a_misnamed_reward_function_is_refused_before_any_model_loads(tmp_path, no_model_load, function, message):
    assert message in stopped(tmp_path, rewards(function))


@pytest.mark.parametrize("function, message", [
    ("gives_nan", "reward function 'mine' returned 1 bad value(s) of 8: row 0 ("),
    ("gives_dict", "reward function 'mine' returned a dict (keys ['score']) for 8 responses"),
])
def test_bad_reward_values_stop_the_run_with_exit_2_naming_the_function(tmp_path, function, message):
    stderr = stopped(tmp_path, rewards(f"{FIXTURE}:{function}"))
    assert message in stderr, stderr


def test_a_reward_that_hangs_times_out_and_the_skip_budget_stops_the_run(tmp_path):
    stderr = stopped(tmp_path, rewards(f"{FIXTURE}:hangs", timeout_s=0.5))
    assert ("reward function 'mine' failed (raised or timed out) on 8 of the 8 rows scored so far (100%), more than "
            "ppo.max_skipped_fraction=0.5") in stderr


def test_reward_settings_out_of_range_are_refused(tmp_path, no_model_load):
    assert "timeout_s must be positive" in stopped(tmp_path, rewards(f"{FIXTURE}:length_reward", timeout_s=0))
    assert "ppo.max_skipped_fraction must be in [0, 1], got 1.5" in stopped(tmp_path, "ppo.max_skipped_fraction=1.5")


@pytest.mark.parametrize("function, kwargs, message", [
    ("format_reward", "{pattern: '<answer>(.*</answer>'}",
     "ppo.rewards[0].kwargs ('mine', rollout.verifiable:format_reward): format_reward: pattern '<answer>(.*</answer>' "
     "is not a valid regular expression: missing ), unterminated subpattern"),
    ("exact_match", "{extract: boxd}", "exact_match: extract='boxd' is not one of ['hash', 'boxed', 'last_number']"),
    ("length_penalty", "{target: 10, cof: 0.1}",
     "length_penalty has no keyword argument 'cof' (did you mean 'coef'?)"),
])
def test_bad_kwargs_of_a_verifiable_reward_are_refused_before_any_model_loads(tmp_path, no_model_load, function,
                                                                              kwargs, message):
    assert message in stopped(tmp_path, rewards(f"rollout.verifiable:{function}", kwargs=kwargs))
