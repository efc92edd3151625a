"""Reward functions that tests name as "tests.rollout.rewards_fixture:<name>"."""


def length_reward(prompts, responses, **fields):
    return [float(len(r)) for r in responses]


def answer_reward(prompts, responses, answer, **fields):
    return [float(r.strip() == a) for r, a in zip(responses, answer)]


def fails_on_x(prompts, responses, **fields):
    if any("x" in r for r in responses):
        raise KeyError("x")
    return [1.0] * len(responses)


def always_fails(prompts, responses, **fields):
    raise RuntimeError("broken")


def wrong_length(prompts, responses, **fields):
    return [0.0] * (len(responses) + 1)


def gives_nan(prompts, responses, **fields):
    return [float("nan")] + [0.0] * (len(responses) - 1)
