"""The RLAIF demo's rows, by hand, and its path at CI size, each step the command configs/rlaif/README.md runs:
judge rows (engine.rlaif_demo), an SFT judge trained on them (engine.train), the labelling command reading
that judge (engine.label), soft-label DPO on its labels (engine.train, soft_dpo), and the DPO policy's
ranking of those pairs measured against the task's own judge (engine.evaluate).

At CI size the judge is the random tiny Llama, and the mistake it learns to see is a plain one (an answer of
zeros); on 24 held-out pairs a judge whose labels were random agrees with the task's judge on about half (21
or more by chance: p = 1.4e-4). The demo's figures (a judge that tells the SFT model's own samples apart on
held-out prompts, DPO on its labels raising the held-out judge score) take too long for a test suite;
configs/rlaif/README.md has them.
"""

from __future__ import annotations

import json

import pytest

from data.synthetic import generate
from data.synthetic import judge as task_judge
from engine import evaluate, label, rlaif_demo
from tests.engine.runs import run, series

N = 24
CONSTITUTION = rlaif_demo.CONSTITUTION


# ---- the judge's training rows, by hand ----------------------------------------------------------------------

# "Sort the letters: c a b" (target a b c): data.synthetic.judge = 0.2 [right length] + 0.8 (1 - edit / longer)
PROMPT = "Sort the letters: c a b"
SCORES = {"a b c": 1.0, "a b": 0.8 * 2 / 3, "a c b": 0.2 + 0.8 / 3, "a b c c": 0.8 * 3 / 4}
TEMPLATE = "{constitution}\nQ: {prompt}\n1: {response_1}\n2: {response_2}\nBetter?"


def test_comparisons_of_samples_are_every_untied_pair_with_the_better_one_marked():
    for response, score in SCORES.items():
        assert rlaif_demo.judge(PROMPT, response) == pytest.approx(score)
    rows = rlaif_demo.sample_comparisons([{"prompt": PROMPT, "responses": ["a b", "a b c", "a b", "a c b"]}])
    # (0, 2) is the same answer twice: tied, left out; 0.533 > 0.467 puts "a b" above "a c b"
    assert [(r["response_1"], r["response_2"], r["better"]) for r in rows] == [
        ("a b", "a b c", 2), ("a b", "a c b", 1), ("a b c", "a b", 1), ("a b c", "a c b", 1), ("a b", "a c b", 1)]


def test_score_rows_rate_each_answer_where_the_prompt_has_just_shown_it():
    assert [rlaif_demo.score_digit(PROMPT, r) for r in SCORES] == ["9", "5", "4", "6"]
    samples = [{"prompt": PROMPT, "responses": ["a b c", "a b"]}, {"prompt": PROMPT, "responses": ["a c b", "a b c c"]}]
    rows = rlaif_demo.judge_rows(None, template=TEMPLATE, constitution="C", samples=samples, score_rows=True)
    shown = [(r["prompt"], r["completion"]) for r in rows]
    assert shown == [
        ("C\nQ: Sort the letters: c a b\n1: a b c\n2: a b\nBetter?", "1"),
        ("C\nQ: Sort the letters: c a b\n1: a b\n2: a b c\nBetter?", "2"),
        ("C\nQ: Sort the letters: c a b\n1: a b c", "9"),  # in the order the comparison was written
        ("C\nQ: Sort the letters: c a b\n1: a b c\n2: a b", "5"),
        ("C\nQ: Sort the letters: c a b\n1: a c b\n2: a b c c\nBetter?", "2"),
        ("C\nQ: Sort the letters: c a b\n1: a b c c\n2: a c b\nBetter?", "1"),
        ("C\nQ: Sort the letters: c a b\n1: a c b", "4"),
        ("C\nQ: Sort the letters: c a b\n1: a c b\n2: a b c c", "6")]
    with pytest.raises(ValueError, match="goes on after the {response_2} line"):
        rlaif_demo.judge_rows(None, template="{constitution} {prompt}\n{response_1}\n{response_2}", constitution="C",
                              samples=samples, score_rows=True)


# ---- the labelling -> DPO path, CI-sized ---------------------------------------------------------------------


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def answered(n: int, seed: int) -> list[dict]:
    """n of the task's prompts, each with two responses: the sorted letters and as many zeros (judge 1 and 0),
    the better one first or second in turn. A mistake this plain is what a judge trained from the random tiny
    model learns at CI size; the demo's judge learns the SFT model's own mistakes (configs/rlaif/README.md)."""
    rows = []
    for i, row in enumerate(generate("prompt", n, seed=seed)):
        good, bad = row["answer"], " ".join("0" for _ in row["answer"].split())
        rows.append({"prompt": row["prompt"], "responses": [good, bad] if i % 2 else [bad, good]})
    return rows


def test_a_judge_trained_on_the_task_labels_held_out_pairs_and_dpo_on_its_labels_ranks_them(tmp_path):
    """The demo's commands in order: judge rows (engine.rlaif_demo --samples), the judge (engine.train, SFT of
    the random tiny model), labels for held-out pairs (engine.label, --compare-with the task's judge),
    soft-label DPO on them (engine.train), its ranking of those pairs as the task's judge orders them
    (engine.evaluate). A judge whose labels were random would agree on about half of the 24 held-out pairs
    (21 or more by chance: p = 1.4e-4), and DPO on such labels would rank about half."""
    samples = write_rows(tmp_path / "samples.jsonl", answered(64, seed=5))
    judge_rows = tmp_path / "judge_sft.jsonl"
    assert len(rlaif_demo.main(["--out", str(judge_rows), "--samples", str(samples)])) == 128
    judge = run("sft.yaml", tmp_path / "judge", f"data.path={judge_rows}", "data.max_length=160",
                "data.max_prompt_length=150", "data.max_samples=128", "data.eval_fraction=0",
                "batch.global_batch_size=16", "batch.micro_batch_size=16", "max_steps=60", "optim.lr=3e-3")
    assert series(judge, "loss")[-1] < 0.1  # from 6.7; at chance (log 2 on the label) it would be about 0.35
    held_out = write_rows(tmp_path / "held_out.jsonl", answered(N, seed=6))
    labelled = tmp_path / "labelled.jsonl"
    report = label.main(["--judge", str(judge.final_dir), "--constitution", str(CONSTITUTION),
                         "--input", str(held_out), "--output", str(labelled), "--no-progress",
                         "--compare-with", "data.synthetic:judge_reward"])
    assert report["agreement"]["pairs"] == N and report["agreement"]["agree"] >= 21 / N
    dpo = run("dpo.yaml", tmp_path / "dpo", "objective.name=soft_dpo", "objective.beta=0.1",
              f"data.path={labelled}", f"data.max_samples={N}", "data.eval_fraction=0",
              "batch.global_batch_size=8", "batch.micro_batch_size=8", "max_steps=15", "optim.lr=1e-3")
    oriented = []
    for row in map(json.loads, held_out.read_text().splitlines()):
        good, bad = sorted(row["responses"], key=lambda r: -task_judge(row["prompt"], r))
        oriented.append({"prompt": row["prompt"], "chosen": good, "rejected": bad})
    pairs = write_rows(tmp_path / "oriented.jsonl", oriented)
    result = evaluate.main(["--model", str(dpo.final_dir), "--reference", "tiny", "--prompts", "none",
                            "--pairs", str(pairs), "--num-pairs", str(N), "--out", str(tmp_path / "eval.json")])
    assert result["metrics"]["pairs/dpo_accuracy"] >= 21 / N
