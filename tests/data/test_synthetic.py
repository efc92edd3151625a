import json
import random

import pytest

from data import synthetic


def test_judge_hand_values():
    p = "Sort the letters: c a b"
    assert synthetic.judge(p, "a b c") == 1.0
    assert synthetic.judge(p, "a b c</s>") == 1.0
    # well formed (0.2) + two substitutions away from "a b c": 0.8 * (1 - 2 / 3)
    assert synthetic.judge(p, "a c b") == pytest.approx(0.2 + 0.8 / 3)
    # 4 letters for 3: not well formed; one insertion away, out of max(4, 3)
    assert synthetic.judge(p, "a b c d") == pytest.approx(0.8 * (1 - 1 / 4))
    # a dropped letter: one deletion away, out of max(2, 3)
    assert synthetic.judge(p, "a c") == pytest.approx(0.8 * (1 - 1 / 3))
    assert synthetic.judge(p, "") == 0.0
    assert synthetic.judge(p, "the answer is abc") == 0.0


def test_edit_distance():
    assert synthetic.edit_distance(list("abc"), list("abc")) == 0
    assert synthetic.edit_distance(list("abc"), list("acb")) == 2
    assert synthetic.edit_distance(list("abc"), list("abxc")) == 1
    assert synthetic.edit_distance([], list("abc")) == 3
    assert synthetic.edit_distance(list("kitten"), list("sitting")) == 3


def test_judge_reads_prompt_inside_templates():
    wrapped = "<|user|>\nSort the letters: c a b</s>\n<|assistant|>\n"
    assert synthetic.judge(wrapped, "a b c") == 1.0
    assert synthetic.judge("Question: Sort the letters: c a b\n\nAnswer: ", "a b c") == 1.0
    with pytest.raises(ValueError, match="not a sorting prompt"):
        synthetic.judge("What is 2+2?", "4")


def test_judge_reward_is_batched_judge():
    rows = synthetic.generate("prompt", 5, seed=1)
    prompts = [r["prompt"] for r in rows]
    responses = [r["answer"] for r in rows]
    assert synthetic.judge_reward(prompts, responses, answer=responses) == [1.0] * 5


def test_chosen_beats_rejected_on_every_pair():
    rows = synthetic.generate("preference", 3000, seed=7)
    for r in rows:
        assert synthetic.judge(r["prompt"], r["chosen"]) == 1.0
        assert synthetic.judge(r["prompt"], r["rejected"]) < 1.0


def test_scores_in_unit_interval_for_random_responses():
    rng = random.Random(0)
    rows = synthetic.generate("prompt", 200, seed=2)
    for r in rows:
        response = " ".join(rng.choice("abcxyz ") for _ in range(rng.randint(0, 12)))
        assert 0.0 <= synthetic.judge(r["prompt"], response) <= 1.0


def test_rows_are_short_for_cpu_training(tmp_path, tok_bos):
    from data import DataConfig, build_datasets

    cfg = DataConfig(cache_dir=str(tmp_path), synthetic_size=300)
    report = build_datasets("sft", cfg, tok_bos, log=None).report.splits["train"]
    assert report.prompt_tokens["p100"] + report.response_tokens["p100"] < 40
    rows = synthetic.generate("prompt", 300, seed=0)
    assert {r["num_letters"] for r in rows} == set(range(4, 11))
    assert any(len(set(r["answer"].split())) < r["num_letters"] for r in rows)


def test_write_synthetic_is_deterministic(tmp_path):
    a = synthetic.write_synthetic(tmp_path / "a", seed=3, n_train=50, n_test=10)
    b = synthetic.write_synthetic(tmp_path / "b", seed=3, n_train=50, n_test=10)
    assert sorted(a) == [f"{f}_{s}" for f in ("preference", "prompt", "sft") for s in ("test", "train")]
    for key in a:
        assert a[key].read_text() == b[key].read_text()
    sft = [json.loads(line) for line in a["sft_train"].read_text().splitlines()]
    assert len(sft) == 50 and set(sft[0]) == {"prompt", "completion"}
    train_prompts = {r["prompt"] for r in sft}
    test_prompts = {json.loads(line)["prompt"] for line in a["sft_test"].read_text().splitlines()}
    assert len(test_prompts - train_prompts) >= 9
