"""The verifiable reward functions, alone and as weighted `ppo.rewards` sources of a Scorer."""

import json

import pytest
import torch

from data import DataConfig, build_datasets, make_collator
from data.tiny_tokenizer import build_tokenizer
from rollout.groups import informative_groups, repeat_prompts
from rollout.scoring import RewardError, RewardFunction, Scorer, check_reward_kwargs, load_reward_function
from rollout.verifiable import (
    answers_equal,
    as_number,
    exact_match,
    extract_boxed,
    extract_hash,
    extract_last_number,
    format_reward,
    length_penalty,
    reference_answer,
)

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def source(name, spec, weight=1.0, **kwargs):
    """A reward source as engine/loops/ppo.py's build_scorer makes one from a `ppo.rewards` entry."""
    return RewardFunction(name, load_reward_function(f"rollout.verifiable:{spec}"), weight, kwargs)


@pytest.mark.parametrize("extract, text, expected", [
    (extract_hash, "so she has #### 1,234", "1,234"),
    (extract_hash, "#### 72 apples\nthe end", "72"),
    (extract_hash, "#### 10\n#### b e m q", "b e m q"),  # the last ####, a non-numeric answer as its line
    (extract_hash, "#### 3/4", "3/4"),  # not a number followed by a space: the whole line
    (extract_hash, "the answer is 72", None),
    (extract_boxed, r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (extract_boxed, r"\boxed{3} or rather \boxed {x^{2}}", "x^{2}"),  # the last one
    (extract_boxed, r"\boxed{\frac{1}{2}", None),  # braces that do not close
    (extract_boxed, "no box here", None),
    (extract_last_number, "first 7, then x = -3.50.", "-3.50"),
    (extract_last_number, "it costs $1,234 in total", "$1,234"),
    (extract_last_number, "5-3", "3"),  # a minus after a digit is not a sign
    (extract_last_number, "no digits at all", None),
])
def test_extraction_rules(extract, text, expected):
    assert extract(text) == expected


def test_numbers_compare_by_value_after_commas_dollars_and_a_trailing_dot():
    assert as_number("1,234") == 1234 and as_number("$1,234") == 1234 and as_number("-3.50.") == as_number("-3.5")
    assert as_number("3/4") is None and as_number("b e") is None and as_number("1,2345") is None
    assert answers_equal("42.0", "42") and answers_equal("$1,234", "1234") and answers_equal("-3.50", "-3.5")
    assert not answers_equal("42.01", "42")
    assert answers_equal(r"\frac{1}{2}", r"\frac{1}{2}.") and answers_equal("b  e", "b e")
    assert not answers_equal(r"\frac{1}{2}", "0.5")  # no symbolic maths: text unless both are plain numbers


def test_reference_answers_in_hash_or_boxed_form_are_cut_by_the_same_rule():
    assert reference_answer(GSM8K_ANSWER) == "72"
    assert reference_answer(r"so the total is $\boxed{\frac{3}{4}}$") == r"\frac{3}{4}"
    assert reference_answer(" b e m q ") == "b e m q" and reference_answer(72) == "72"
    assert reference_answer(None) is None and reference_answer("  ") is None


def test_exact_match_against_the_answer_column():
    responses = ["... #### 72", "#### 72.0", "#### 71", "The answer is 72", "#### seventy-two", ""]
    fields = {"answer": [GSM8K_ANSWER] * 6, "num_letters": [0] * 6}
    assert exact_match([""] * 6, responses, **fields) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert exact_match([""] * 6, responses, extract="last_number", **fields) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert exact_match(["", ""], [r"\boxed{72}", r"\boxed{27}"], extract="boxed", solution=["#### 72", "72"],
                       answer_key="solution") == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"no column 'answer' among the prompt rows' fields \['solution'\]"):
        exact_match([""], ["#### 1"], solution=["1"])
    with pytest.raises(RewardError, match=r"extract='hashes' is not one of \['hash', 'boxed', 'last_number'\]"):
        exact_match([""], ["#### 1"], extract="hashes", answer=["1"])


def test_the_answer_column_reaches_exact_match_through_the_data_layer_and_the_scorer(tmp_path):
    """GSM8K-style rows read as `qa`: the collator keeps `answer` in `extras`, the rows are repeated into
    groups of 2, and the PPO loop's step 2 turns extras into the Scorer's fields. A row with no reference is
    skipped (valid False), not scored 0."""
    rows = [{"question": "Natalia sold clips to 48 friends ...", "answer": GSM8K_ANSWER},
            {"question": "What is 3 + 4?", "answer": "7"},
            {"question": "A question with no answer", "answer": None}]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = build_tokenizer(tmp_path / "tok")
    data = build_datasets("prompt", DataConfig(path=str(path), eval_fraction=0.0, cache_dir=str(tmp_path / "cache")),
                          tokenizer, log=None).train
    batch = repeat_prompts(make_collator("prompt", tokenizer)(list(data)), 2)
    extras = batch["extras"]
    fields = {key: [row.get(key) for row in extras] for key in dict.fromkeys(k for row in extras for k in row)}
    assert fields["answer"] == [GSM8K_ANSWER, GSM8K_ANSWER, "7", "7", None, None]

    responses = ["#### 72", "#### 70", "3 + 4 = #### 7", "#### 7.0", "#### 1", "#### 2"]
    out = Scorer([source("correct", "exact_match")])(batch["prompt"], responses, no_eos=torch.zeros(6, dtype=bool),
                                                     fields=fields)
    assert out.scores.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert out.valid.tolist() == [True, True, True, True, False, False]
    assert out.metrics["objective/score/correct"] == 0.75 and out.metrics["rollout/skipped"] == 2
    assert informative_groups(out.scores, 2, valid=out.valid).tolist() == [True, False, False]


THINK = r"<think>.*</think>\s*<answer>.*</answer>"


def test_format_reward_fullmatch_or_search_across_lines():
    responses = ["<think>a\nb</think>\n<answer>7</answer>", " <think>a</think><answer>7</answer>",
                 "<answer>7</answer>", "<think>a</think><answer>7</answer> and more"]
    assert format_reward([""] * 4, responses, pattern=THINK) == [1.0, 0.0, 0.0, 0.0]
    assert format_reward([""] * 4, responses, pattern=THINK, mode="search") == [1.0, 1.0, 0.0, 1.0]


def test_a_bad_format_setting_is_named():
    with pytest.raises(RewardError, match=r"pattern '<think>\(' is not a valid regular expression: missing \)"):
        format_reward([""], ["x"], pattern="<think>(")
    with pytest.raises(RewardError, match=r"mode='match' is not one of \['fullmatch', 'search'\]"):
        format_reward([""], ["x"], pattern="x", mode="match")


def test_length_penalty_in_characters_and_in_tokens(tmp_path):
    """"b e m q" is 7 characters and 4 tokens of the tiny tokenizer (b, Ġe, Ġm, Ġq): past a target of 3,
    at 0.5 a unit, -2.0 in characters and -0.5 in tokens; at or under the target, 0."""
    responses = ["b e m q", "abc", ""]
    assert length_penalty([""] * 3, responses, target=3, coef=0.5) == [-2.0, 0.0, 0.0]
    build_tokenizer(tmp_path / "tok")
    assert length_penalty([""] * 3, responses, target=3, coef=0.5, unit="tokens",
                          tokenizer=str(tmp_path / "tok")) == [-0.5, 0.0, 0.0]


@pytest.mark.parametrize("fn, kwargs, message", [
    (format_reward, {"pattern": "(a"}, "format_reward: pattern '(a' is not a valid regular expression"),
    (format_reward, {"patern": "a"}, "format_reward has no keyword argument 'patern' (did you mean 'pattern'?)"),
    (format_reward, {}, "format_reward needs kwargs pattern"),
    (exact_match, {"extract": "box"}, "exact_match: extract='box' is not one of"),
    (exact_match, {"answer_keys": "a"}, "no keyword argument 'answer_keys' (did you mean 'answer_key'?)"),
    (length_penalty, {"target": -1}, "length_penalty: target must be a number >= 0, got -1"),
    (length_penalty, {"target": 10, "unit": "tokens"}, "unit=tokens needs kwargs.tokenizer"),
    (length_penalty, {"target": 10, "unit": "tokens", "tokenizer": "/no/such/tokenizer"},
     "length_penalty: tokenizer '/no/such/tokenizer' does not load"),
])
def test_bad_kwargs_are_refused_by_the_start_up_check(fn, kwargs, message):
    with pytest.raises(ValueError) as error:
        check_reward_kwargs(fn, kwargs)
    assert message in str(error.value)


def test_the_start_up_check_passes_good_kwargs_and_binds_other_functions_against_their_signature():
    check_reward_kwargs(format_reward, {"pattern": THINK, "mode": "search"})
    check_reward_kwargs(exact_match, {})
    check_reward_kwargs(length_penalty, {"target": 10, "coef": 0.1})

    def scaled(prompts, responses, *, scale):
        return [scale] * len(responses)

    check_reward_kwargs(scaled, {"scale": 2.0})
    with pytest.raises(ValueError, match="kwargs {'scal': 2.0} do not fit its signature"):
        check_reward_kwargs(scaled, {"scal": 2.0})


def test_two_weighted_verifiable_sources_sum_and_log_per_source():
    """exact_match (boxed, weight 2) and format_reward (weight 0.5) on four responses to reference "42":

        response                 correct  format  2 * correct + 0.5 * format
        "so \\boxed{42}"            1        1       2.5
        "\\boxed{41}"               0        1       0.5
        "my answer: \\boxed{x}"     0        1       0.5
        "\\boxed{42} done"          1        0       2.0

    objective/score/<name> is each source's own mean (0.5 and 0.75), objective/score the weighted mean 1.375.
    """
    responses = [r"so \boxed{42}", r"\boxed{41}", r"my answer: \boxed{x}", r"\boxed{42} done"]
    scorer = Scorer([source("correct", "exact_match", 2.0, extract="boxed"),
                     source("format", "format_reward", 0.5, pattern=r".*\\boxed\{.+\}")])
    out = scorer([""] * 4, responses, no_eos=torch.zeros(4, dtype=torch.bool), fields={"answer": ["42"] * 4})
    assert out.scores.tolist() == [2.5, 0.5, 0.5, 2.0]
    assert out.metrics["objective/score/correct"] == 0.5
    assert out.metrics["objective/score/format"] == 0.75
    assert out.metrics["objective/score"] == 1.375 and out.metrics["objective/score_raw"] == 1.375
