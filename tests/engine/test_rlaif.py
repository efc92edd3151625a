"""RLAIF: the judge's prompt tokens, its label probabilities, the two-order average, the labelling command, the
soft labels reaching the reward and DPO losses through the loops, and the judge as a PPO/GRPO reward source.

Judges here are stubs with the Hugging Face causal-LM call signature (`model(input_ids, attention_mask,
position_ids, logits_to_keep, use_cache).logits`, (B, 1, V)) whose label logits are set by hand, or the tiny
Llama itself, checked against its own unpadded forward.
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from data.synthetic import judge as task_judge
from engine import label as label_cli
from engine.label import (
    COMPARE_TEMPLATE,
    Pair,
    judge_formatter,
    label_pairs,
    load_judge,
    read_pairs,
    read_template,
)
from engine.models import load_tokenizer
from engine.tiny import resolve_model_path
from rollout.judge import Judge, JudgeReward, check_template, compare, fill, label_token_ids
from tests.engine.runs import mean, run, run_cli, series

CONSTITUTION = "Sort well."
TEMPLATE = "{constitution}\nQ: {prompt}\nA: {response_1}\nB: {response_2}\nBetter:"
PAIR_LINES = re.compile(r"Prompt: (.*)\nResponse 1: (.*)\nResponse 2: (.*)\n")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


class StubJudge(torch.nn.Module):
    """A causal LM whose next-token logits are 0 except at `label_ids`, where `label_logits(text)` puts them,
    text being the decoded judge prompt. Records the keyword arguments of each call."""

    def __init__(self, tokenizer, label_ids, label_logits):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device to be found on
        self.tokenizer, self.label_ids, self.label_logits = tokenizer, list(label_ids), label_logits
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=None):
        self.calls.append({"logits_to_keep": logits_to_keep, "left_padded": bool((attention_mask[:, -1] == 1).all())})
        logits = torch.zeros(input_ids.shape[0], 1, len(self.tokenizer))
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            text = self.tokenizer.decode(ids[mask.bool()])
            logits[row, 0, self.label_ids] = torch.tensor(self.label_logits(text), dtype=torch.float32)
        return SimpleNamespace(logits=logits)


def stub(tokenizer, label_logits, labels=("1", "2"), micro_batch_size=4) -> Judge:
    formatter = judge_formatter(tokenizer)
    ids = label_token_ids(formatter.encode, labels)
    model = StubJudge(tokenizer, ids, label_logits)
    return Judge(model, lambda text: formatter.prompt_ids([{"role": "user", "content": text}]), ids,
                 tokenizer.pad_token_id, labels, micro_batch_size)


def reading_judge(tokenizer, scale: float, bias: float = 0.0) -> Judge:
    """logit("1") = scale * (score(response 1) - score(response 2)) + bias, logit("2") = 0, the scores the
    sorting task's judge; so P("1") = sigmoid(scale * delta + bias)."""
    def logits(text):
        prompt, first, second = PAIR_LINES.search(text).groups()
        return [scale * (task_judge(prompt, first) - task_judge(prompt, second)) + bias, 0.0]
    return stub(tokenizer, logits)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- the judge prompt, the labels, the label probabilities -------------------------------------------------


def test_the_judge_prompt_is_the_filled_template_in_one_user_turn(tokenizer):
    judge = stub(tokenizer, lambda text: [0.0, 0.0])
    text = fill(TEMPLATE, constitution=CONSTITUTION, prompt="Sort the letters: b a", response_1="a b",
                response_2="b a")
    assert text == "Sort well.\nQ: Sort the letters: b a\nA: a b\nB: b a\nBetter:"
    # the tiny tokenizer adds <s>; its Zephyr chat template writes the turn and the assistant's header
    expected = "<|user|>\nSort well.\nQ: Sort the letters: b a\nA: a b\nB: b a\nBetter:</s>\n<|assistant|>\n"
    assert judge.encode(text) == tokenizer(expected).input_ids
    assert judge.encode(text)[0] == tokenizer.bos_token_id and judge.encode(text).count(tokenizer.bos_token_id) == 1
    plain = judge_formatter(tokenizer, "plain")
    assert plain.prompt_ids([{"role": "user", "content": text}]) == tokenizer(text).input_ids
    # the default template file, with its last newline dropped
    default = read_template(COMPARE_TEMPLATE)
    assert default.endswith("Answer 1 or 2.") and COMPARE_TEMPLATE.read_text() == default + "\n"


def test_labels_must_be_single_distinct_tokens(tokenizer):
    encode = judge_formatter(tokenizer).encode
    assert label_token_ids(encode, ["1", "2"]) == tokenizer.convert_tokens_to_ids(["1", "2"])
    with pytest.raises(ValueError, match=r"'10' -> 2 tokens \[23, 22\]"):
        label_token_ids(encode, ["10", "2"])
    with pytest.raises(ValueError, match="must be distinct"):
        label_token_ids(encode, ["1", "1"])


def test_templates_are_checked_for_their_fields():
    check_template(TEMPLATE, ("constitution", "prompt", "response_1", "response_2"))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \{answer\}; missing \{response_2\}"):
        check_template("{constitution} {prompt} {response_1} {answer}", ("constitution", "prompt", "response_1",
                                                                         "response_2"))
    with pytest.raises(ValueError, match="literal brace"):
        check_template("{constitution} {prompt", ("constitution", "prompt"))


def test_label_probabilities_of_the_tiny_model_equal_its_unpadded_forward(tokenizer):
    """Two prompts of different lengths in one left-padded batch: each row's P(label) is the softmax over the
    two label logits of the model's own forward of that prompt alone."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    formatter = judge_formatter(tokenizer)
    ids = label_token_ids(formatter.encode, ["1", "2"])
    judge = Judge(model, lambda text: formatter.prompt_ids([{"role": "user", "content": text}]), ids,
                  tokenizer.pad_token_id, ("1", "2"), micro_batch_size=2)
    texts = ["Sort the letters: b a", "Which is better, a longer prompt or a short one? Answer 1 or 2."]
    probs = judge.label_probs(texts)
    assert probs.dtype == torch.float64 and probs.shape == (2, 2)
    for row, text in enumerate(texts):
        alone = model(input_ids=torch.tensor([judge.encode(text)])).logits[0, -1, ids].double()
        torch.testing.assert_close(probs[row], torch.softmax(alone, -1), rtol=0, atol=1e-6)
    assert not torch.allclose(probs[0], probs[1])


# ---- both orders -------------------------------------------------------------------------------------------


def test_a_judge_that_always_answers_1_prefers_nothing_and_every_pair_is_dropped(tokenizer):
    """P("1") = sigmoid(10) whatever it reads: q(A, B) = q(B, A), so p = 1/2 and confidence 0 exactly."""
    judge = stub(tokenizer, lambda text: [10.0, 0.0])
    pairs = [Pair("Sort the letters: b a", "a b", "b a"), Pair("Sort the letters: c a b", "a c", "a b c"),
             Pair("Sort the letters: d c", "c d", "d")]
    judged = compare(judge, read_template(COMPARE_TEMPLATE), CONSTITUTION, [p.prompt for p in pairs],
                     [p.a for p in pairs], [p.b for p in pairs])
    assert judged.q_ab.tolist() == pytest.approx([sigmoid(10.0)] * 3, rel=1e-6)
    assert judged.p.tolist() == [0.5, 0.5, 0.5] and judged.confidence.tolist() == [0.0, 0.0, 0.0]
    for threshold in (1e-12, 0.2):
        rows, report = label_pairs(judge, read_template(COMPARE_TEMPLATE), CONSTITUTION, pairs,
                                   min_confidence=threshold)
        assert rows == [] and report["dropped_low_confidence"] == 3 and report["kept"] == 0
    rows, report = label_pairs(judge, read_template(COMPARE_TEMPLATE), CONSTITUTION, pairs, min_confidence=0.0)
    assert [(r["chosen"], r["soft_label"], r["confidence"]) for r in rows] == [(p.a, 0.5, 0.0) for p in pairs]
    assert report["position_bias"] == pytest.approx(sigmoid(10.0), rel=1e-6)  # it always says "1"
    assert all(call["logits_to_keep"] == 1 for call in judge.model.calls)


def test_the_two_orders_average_out_a_position_bias_by_hand(tokenizer):
    """"Sort the letters: b a": A = "a b" scores 1, B = "b a" scores 0.2 (the form, no letter in place):
    delta = 0.8. With scale 5 and a bias of +1 towards label 1, q(A, B) = sigmoid(4 + 1) = 0.9933071 and
    q(B, A) = sigmoid(-4 + 1) = 0.0474259, so p = (0.9933071 + 1 - 0.0474259) / 2 = 0.9729406 and the
    confidence |2p - 1| = 0.9458812. Shown in the other order first, the same pair gets 1 - p."""
    judge = reading_judge(tokenizer, scale=5.0, bias=1.0)
    assert task_judge("Sort the letters: b a", "b a") == pytest.approx(0.2)
    judged = compare(judge, read_template(COMPARE_TEMPLATE), CONSTITUTION, ["Sort the letters: b a"] * 2,
                     ["a b", "b a"], ["b a", "a b"])
    q_ab, q_ba = sigmoid(5.0), sigmoid(-3.0)
    assert (q_ab, q_ba) == pytest.approx((0.9933071, 0.0474259), abs=1e-7)
    assert judged.p.tolist() == pytest.approx([(q_ab + 1 - q_ba) / 2, (q_ba + 1 - q_ab) / 2], rel=1e-6)
    assert judged.p[0].item() == pytest.approx(0.9729406, abs=1e-6)
    assert judged.confidence.tolist() == pytest.approx([q_ab - q_ba] * 2, rel=1e-6)
    rows, _ = label_pairs(judge, read_template(COMPARE_TEMPLATE), CONSTITUTION,
                          [Pair("Sort the letters: b a", "b a", "a b")])
    assert rows[0]["chosen"] == "a b" and rows[0]["rejected"] == "b a"  # flipped to the preferred one first
    assert rows[0]["soft_label"] == pytest.approx(0.9729406, abs=1e-6)


# ---- the labelling command ---------------------------------------------------------------------------------


def test_pairs_from_chosen_rejected_rows_and_from_response_lists(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "Sort the letters: b a", "chosen": "a b", "rejected": "b a"}) + "\n"
                    + json.dumps({"prompt": "Sort the letters: c b a", "responses": ["a b c", "a c", "a b c", "c"]})
                    + "\n")
    pairs, counts = read_pairs(path, "all")
    # 1 + 4 * 3 / 2 = 7 pairs, of which ("a b c", "a b c") is skipped
    assert counts == {"rows": 2, "pairs_formed": 7, "skipped_identical": 1}
    assert pairs[0] == Pair("Sort the letters: b a", "a b", "b a")
    assert [(p.a, p.b) for p in pairs[1:]] == [("a b c", "a c"), ("a b c", "c"), ("a c", "a b c"), ("a c", "c"),
                                               ("a b c", "c")]
    adjacent, counts = read_pairs(path, "adjacent")
    assert counts == {"rows": 2, "pairs_formed": 4, "skipped_identical": 0}
    assert [(p.a, p.b) for p in adjacent[1:]] == [("a b c", "a c"), ("a c", "a b c"), ("a b c", "c")]
    path.write_text(json.dumps({"prompt": "x", "responses": ["only one"]}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'responses' must be a list of two or more strings"):
        read_pairs(path)


def test_the_command_labels_a_file_with_a_judge_from_disk(tmp_path, capsys):
    """The random tiny model as the judge: every pair is written with its soft label and confidence as the
    two-order average defines them, the report counts what happened, and a label of two tokens stops the
    command before the judge loads."""
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "Sort the letters: b a", "chosen": "a b", "rejected": "b a"},
        {"prompt": "Sort the letters: e d c", "responses": ["c d e", "c e", "c d e"]}]))
    constitution = tmp_path / "constitution.txt"
    constitution.write_text(CONSTITUTION + "\n")
    out = tmp_path / "labelled.jsonl"
    args = ["--judge", resolve_model_path("tiny"), "--constitution", str(constitution), "--input", str(source),
            "--output", str(out), "--no-progress", "--compare-with", "data.synthetic:judge_reward"]
    report = label_cli.main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report == json.loads(out.with_suffix(".report.json").read_text())
    assert (report["rows"], report["pairs_formed"], report["skipped_identical"], report["judged"]) == (2, 4, 1, 3)
    assert report["kept"] == 3 and report["label_ids"] == [23, 24]
    assert {r["prompt"] for r in rows} == {"Sort the letters: b a", "Sort the letters: e d c"}
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "soft_label", "confidence"}
        assert 0.5 <= row["soft_label"] <= 1 and row["confidence"] == pytest.approx(2 * row["soft_label"] - 1)
    assert report["agreement"]["pairs"] == 3 and report["agreement"]["with"] == "data.synthetic:judge_reward"
    assert "kept 3, dropped 0 below confidence 0" in capsys.readouterr().err
    # a threshold above every confidence keeps nothing and says so
    top = max(row["confidence"] for row in rows)
    report = label_cli.main([*args, "--min-confidence", str(min(1.0, top + 1e-6))])
    assert report["kept"] == 0 and report["dropped_low_confidence"] == 3 and out.read_text() == ""
    with pytest.raises(SystemExit, match=r"'10' -> 2 tokens"):
        label_cli.main([*args, "--labels", "10", "2"])


# ---- soft labels through the loops --------------------------------------------------------------------------


def synthetic_pairs(n: int) -> list[Pair]:
    """The task's preference pairs, shown with the better response first or second in turn."""
    from data.synthetic import generate

    rows = generate("preference", n, seed=3)
    return [Pair(r["prompt"], r["chosen"], r["rejected"]) if i % 2 else Pair(r["prompt"], r["rejected"], r["chosen"])
            for i, r in enumerate(rows)]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


PAIRS16 = ["data.max_samples=16", "batch.global_batch_size=16", "batch.micro_batch_size=8", "data.eval_fraction=0"]


def test_labelling_then_soft_label_dpo(tmp_path, tokenizer):
    """The CI-sized RLAIF path: 16 of the task's pairs, half shown worse-first, labelled by a judge that reads
    the task's scores (P("1") = sigmoid(4 delta)), then soft-label DPO from the tiny model on the file.

    Each pair's soft label is sigmoid(4 |delta|) (the two orders agree: p = (q + 1 - (1 - q)) / 2 = q), and
    every chosen is the better response. The loss receives the file's soft labels (the logged mean equals the
    file's: all 16 pairs are in every step), and DPO ranks the training pairs. With every soft label 0.5 the
    gradient at the start, beta (sigmoid(0) - 0.5), is 0: the policy never leaves the reference and the loss
    is log 2 at every step, which it would not be if the loss saw hard labels."""
    pairs = synthetic_pairs(16)
    rows, report = label_pairs(reading_judge(tokenizer, scale=4.0), read_template(COMPARE_TEMPLATE), CONSTITUTION,
                               pairs, min_confidence=0.0)
    assert report["kept"] == 16 and report["position_bias"] == pytest.approx(0.5, abs=1e-6)
    for pair, row in zip(pairs, rows):
        delta = abs(task_judge(pair.prompt, pair.a) - task_judge(pair.prompt, pair.b))
        assert row["soft_label"] == pytest.approx(sigmoid(4 * delta), rel=1e-6)
        assert task_judge(row["prompt"], row["chosen"]) > task_judge(row["prompt"], row["rejected"])
    labelled = write_rows(tmp_path / "labelled.jsonl", rows)

    result = run("dpo.yaml", tmp_path / "soft_dpo", "objective.name=soft_dpo", "objective.beta=0.1",
                 f"data.path={labelled}", "max_steps=12", "optim.lr=1e-3", *PAIRS16)
    assert series(result, "labels/soft_label")[0] == pytest.approx(mean(r["soft_label"] for r in rows), rel=1e-6)
    assert mean(series(result, "rewards/accuracies")[-3:]) >= 0.9

    halves = write_rows(tmp_path / "halves.jsonl", [{**row, "soft_label": 0.5} for row in rows])
    flat = run("dpo.yaml", tmp_path / "flat", "objective.name=soft_dpo", "objective.beta=0.1", f"data.path={halves}",
               "max_steps=4", "optim.lr=1e-3", *PAIRS16)
    assert series(flat, "loss") == pytest.approx([math.log(2)] * 4, abs=1e-6)
    assert series(flat, "rewards/margins") == [0.0] * 4


def test_soft_labels_reach_the_reward_loss(tmp_path):
    """soft_reward with every soft label 0.5: the logged label mean is 0.5 at every step, and the loss,
    softplus(-d) + d / 2 = log(2 cosh(d / 2)) per pair, never falls below log 2."""
    rows = [{"prompt": p.prompt, "chosen": p.a, "rejected": p.b, "soft_label": 0.5} for p in synthetic_pairs(16)]
    result = run("reward.yaml", tmp_path / "reward", "objective.name=soft_reward",
                 f"data.path={write_rows(tmp_path / 'halves.jsonl', rows)}", "max_steps=6", "optim.lr=1e-3", *PAIRS16)
    assert series(result, "labels/soft_label") == [0.5] * 6
    assert min(series(result, "loss")) >= math.log(2) - 1e-6


def test_an_objective_that_reads_soft_labels_refuses_data_without_them(tmp_path):
    rows = [{"prompt": p.prompt, "chosen": p.a, "rejected": p.b} for p in synthetic_pairs(16)]
    code, err = run_cli("dpo.yaml", tmp_path / "run", "objective.name=soft_dpo", "objective.beta=0.1",
                        f"data.path={write_rows(tmp_path / 'hard.jsonl', rows)}", "max_steps=1", *PAIRS16)
    assert code == 2 and "reads each pair's 'soft_label'" in err and "python -m engine.label" in err
    code, err = run_cli("dpo.yaml", tmp_path / "run2", "objective.name=soft_dpo", "objective.beta=0.1",
                        "objective.soft_label=0.9", "max_steps=1", *PAIRS16)
    assert code == 2 and "'soft_label' is read per pair from the data" in err


# ---- the judge as a reward source ---------------------------------------------------------------------------


def test_judge_reward_scores_the_expected_rating(tokenizer):
    """Labels 1, 2, 3 with logits 0, log 2, log 3: probabilities 1/6, 2/6, 3/6, expected rating
    (1 + 4 + 9) / 6 = 7/3; with values (1, 0, 0) the score is P("1") = 1/6 (to float32 logits' rounding)."""
    judge = stub(tokenizer, lambda text: [0.0, math.log(2), math.log(3)], labels=("1", "2", "3"))
    template = "{constitution}\n{prompt}\n{response}\nScore:"
    rating = JudgeReward("rating", judge, template, CONSTITUTION, values=(1, 2, 3))
    scores, ok = rating(["Sort the letters: b a"] * 2, ["a b", "b a"], {})
    assert scores.dtype == torch.float64 and ok.tolist() == [True, True]
    assert scores.tolist() == pytest.approx([7 / 3, 7 / 3], rel=1e-7)
    good = JudgeReward("good", judge, template, CONSTITUTION, values=(1, 0, 0))
    assert good(["Sort the letters: b a"], ["a b"], {})[0].tolist() == pytest.approx([1 / 6], rel=1e-7)
    with pytest.raises(ValueError, match="missing \\{response\\}"):
        JudgeReward("bad", judge, "{constitution} {prompt}", CONSTITUTION, values=(1, 2, 3))


@pytest.fixture(scope="module")
def undecided_judge(tmp_path_factory):
    """The tiny Llama with its LM head zeroed: every logit is 0, so P("1") = 1/2 whatever it reads."""
    out = tmp_path_factory.mktemp("undecided_judge")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    torch.nn.init.zeros_(model.lm_head.weight)
    model.save_pretrained(out)
    load_tokenizer("tiny").save_pretrained(out)
    (out / "constitution.txt").write_text(CONSTITUTION + "\n")
    return out


def test_a_judge_rewards_grpo_through_ppo_rewards(tmp_path, undecided_judge):
    """ppo.rewards: [{name: judge, judge: ..., constitution: ..., weight: 2}]: the source scores 1/2 for every
    response (objective/score/judge) and the weighted score is 2 x 1/2 = 1 at every iteration."""
    from tests.engine.test_grpo_runs import SMALL, run_online

    rewards = (f"ppo.rewards=[{{name: judge, judge: {undecided_judge}, constitution: "
               f"{undecided_judge / 'constitution.txt'}, weight: 2.0}}]")
    result = run_online("grpo.yaml", tmp_path / "grpo", *SMALL, rewards, "ppo.missing_eos_penalty=null", "max_steps=2")
    assert [r["objective/score/judge"] for r in result.history] == [0.5, 0.5]
    assert [r["objective/score"] for r in result.history] == [1.0, 1.0]


def test_a_judge_source_with_a_bad_label_stops_before_any_model_loads(tmp_path, undecided_judge, no_model_load):
    rewards = (f"ppo.rewards=[{{name: judge, judge: {undecided_judge}, constitution: "
               f"{undecided_judge / 'constitution.txt'}, labels: [10, 2]}}]")
    code, err = run_cli("grpo.yaml", tmp_path / "run", "model.name_or_path=tiny", rewards, "max_steps=1")
    assert code == 2 and "ppo.rewards[0]" in err and "'10' -> 2 tokens" in err
    rewards = f"ppo.rewards=[{{name: judge, judge: {undecided_judge}}}]"
    code, err = run_cli("grpo.yaml", tmp_path / "run", "model.name_or_path=tiny", rewards, "max_steps=1")
    assert code == 2 and "a judge needs `constitution`" in err


def test_load_judge_places_the_model_and_checks_labels_first(undecided_judge, monkeypatch):
    judge = load_judge(str(undecided_judge), device="cpu", micro_batch_size=3)
    assert judge.label_ids == [23, 24] and judge.micro_batch_size == 3
    assert judge.label_probs(["Sort the letters: b a"]).tolist() == [[0.5, 0.5]]
    import engine.generate

    monkeypatch.setattr(engine.generate, "load_model", lambda *a, **k: pytest.fail("the weights loaded"))
    with pytest.raises(ValueError, match="'10' -> 2 tokens"):
        load_judge(str(undecided_judge), labels=("10", "2"))
