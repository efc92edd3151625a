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


def gives_inf(prompts, responses, **fields):
    return [0.0] * (len(responses) - 1) + [float("-inf")]


def gives_none(prompts, responses, **fields):
    return [None] * len(responses)


def gives_strings(prompts, responses, **fields):
    return ["0.5"] * len(responses)


def gives_dict(prompts, responses, **fields):
    return {"score": [0.0] * len(responses)}


def gives_huge(prompts, responses, **fields):
    return [1e300 * (i % 2) for i in range(len(responses))]


def hangs(prompts, responses, **fields):
    import time

    time.sleep(600)
    return [0.0] * len(responses)

