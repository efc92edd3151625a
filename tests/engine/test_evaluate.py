"""engine/evaluate.py: each metric on a case checked by hand or against a plain loop, on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine import evaluate as ev
from engine.generate import PromptEncoder, load_model
from engine.models import load_tokenizer
from engine.tiny import build_tiny_model, resolve_model_path
from rollout.generation import SamplingConfig, generate


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return resolve_model_path("tiny")


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory) -> str:
    """The tiny architecture and tokenizer with other random weights: a reference that differs."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "seed1", seed=1))


def small(**kwargs) -> ev.EvaluationConfig:
    defaults = dict(num_prompts=6, num_pairs=6, max_new_tokens=6, batch_size=4, samples=3)
    return ev.EvaluationConfig(**{**defaults, **kwargs})


def test_win_rate_pair_accuracy_and_log_odds_by_hand():
    # wins at 0, tie at 1 and 3, loss at 2: (1 + 0.5 + 0 + 0.5) / 4
    assert ev.win_rate(torch.tensor([1.0, 2, 3, 4]), torch.tensor([0.0, 2, 5, 4])) == 0.5
    # a tie is not a correct ranking, as in training's rewards/accuracies: 2 of 4
    assert ev.pair_accuracy(torch.tensor([1.0, 2, 3, 4]), torch.tensor([0.0, 2, 5, 3])) == 0.5
    # p = 1/2 -> log 1 = 0;  p = 4/5 -> log 4
    torch.testing.assert_close(ev.log_odds(torch.log(torch.tensor([0.5, 0.8]))),
                               torch.tensor([0.0, math.log(4.0)]), rtol=1e-6, atol=1e-6)
    # the ORPO loss's own formula near p = 1, where a clamp at 1 - 1e-7 would read log odds 16.1 for both:
    # p = 1 - 1e-9 -> log((1 - 1e-9) / 1e-9) = 20.723; p = 1 - 1e-12 -> 27.631 (float64)
    near_one = torch.log1p(-torch.tensor([1e-9, 1e-12], dtype=torch.float64))
    torch.testing.assert_close(ev.log_odds(near_one), torch.tensor([20.7232658, 27.6310211], dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_judge_metrics_of_fixed_responses(tiny_dir, monkeypatch):
    """Sorting 'c a b' right scores 1; 'a b c' for 'd c b a' has the wrong count (no format credit) and is one
    edit (insert d) from the answer: 0.8 * (1 - 1/4) = 0.6. Mean 0.8, one of two solved."""
    rows = [{"prompt": "Sort the letters: c a b"}, {"prompt": "Sort the letters: d c b a"}]
    evaluator = ev.Evaluator(small(model=tiny_dir))
    real_sample = evaluator.sample

    def fixed(model, prompts):
        _, generations = real_sample(model, prompts)
        return ["a b c", "a b c"], generations

    monkeypatch.setattr(evaluator, "sample", fixed)
    metrics, samples = evaluator.prompts(rows)
    assert metrics["judge/score"] == pytest.approx(0.8, abs=1e-12)
    assert metrics["judge/solved"] == 0.5
    assert [s["judge"] for s in samples] == pytest.approx([1.0, 0.6], abs=1e-12)
    assert "objective/kl" not in metrics and "reward_model/win_rate" not in metrics


def test_against_itself_kl_is_zero_win_rate_one_half_and_lengths_match_rollout(tiny_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = ev.main(["--model", tiny_dir, "--reference", tiny_dir, "--reward-model", "tiny-reward",
                      "--num-prompts", "6", "--num-pairs", "6", "--max-new-tokens", "6", "--batch-size", "4",
                      "--samples", "2", "--out", str(out)])
    metrics = result["metrics"]
    assert json.loads(out.read_text())["metrics"] == metrics
    assert metrics["objective/kl"] == 0.0
    assert metrics["reward_model/win_rate"] == 0.5
    assert metrics["judge/score"] == metrics["judge/score_reference"]
    assert metrics["reward_model/score"] == metrics["reward_model/score_reference"]
    # the batched accuracy is the share of pairs whose chosen response, scored alone, beats its rejected one
    evaluator = ev.Evaluator(small(reward_model="tiny-reward"))
    alone = [(evaluator.reward([row["prompt"]], [row["chosen"]], {})[0].item(),
              evaluator.reward([row["prompt"]], [row["rejected"]], {})[0].item())
             for row in ev.synthetic_rows("preference", 6, 0)]
    assert metrics["pairs/reward_model_accuracy"] == pytest.approx(sum(c > r for c, r in alone) / 6, abs=1e-12)
    assert [s["response"] for s in result["samples"]] == [s["reference_response"] for s in result["samples"]]

    # length and EOS share as rollout.generation counts them, for the same prompts and seed
    prompts = [row["prompt"] for row in ev.synthetic_rows("prompt", 6, 0)]
    tokenizer = load_tokenizer(tiny_dir)
    input_ids, attention_mask = PromptEncoder(tokenizer).batch(prompts[:4])
    gen = generate(load_model(tiny_dir), input_ids, attention_mask, SamplingConfig(max_new_tokens=6),
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   generator=torch.Generator().manual_seed(0))
    first_batch = ev.Evaluator(small(model=tiny_dir, num_prompts=4)).prompts([{"prompt": p} for p in prompts[:4]])[0]
    assert first_batch["response/length"] == pytest.approx(gen.response_length.double().mean().item())
    assert first_batch["response/eos"] == pytest.approx(1 - gen.no_eos.double().mean().item())


def test_zero_prompts_or_pairs_skip_that_part_and_a_negative_count_exits_2(tiny_dir, capsys):
    """0 means none, as `--prompts none` / `--pairs none`: no generation with 0 prompts, no pair metrics with 0
    pairs (0 pairs used to reach torch.cat of no batches)."""
    common = ["--model", tiny_dir, "--max-new-tokens", "4", "--batch-size", "4", "--samples", "2"]
    no_pairs = ev.main([*common, "--num-prompts", "3", "--num-pairs", "0"])["metrics"]
    assert no_pairs["num_prompts"] == 3 and "num_pairs" not in no_pairs and "pairs/dpo_accuracy" not in no_pairs
    no_prompts = ev.main([*common, "--num-prompts", "0", "--num-pairs", "2"])
    assert no_prompts["samples"] == [] and "judge/score" not in no_prompts["metrics"]
    assert no_prompts["metrics"]["num_pairs"] == 2
    with pytest.raises(SystemExit) as error:
        ev.main([*common, "--num-pairs", "-1"])
    assert error.value.code == 2 and "--num-pairs must be 0 (none) or more, got -1" in capsys.readouterr().err


def test_reward_model_accuracy_is_the_share_of_pairs_ranked_right():
    """Scores by hand (the response's length): two pairs ranked right, one wrong, one tie (wrong, as the
    reward loss's accuracy counts it): 2 / 4."""
    evaluator = ev.Evaluator(small(reward_model="tiny-reward"))
    evaluator.reward = lambda prompts, responses, fields: (torch.tensor([float(len(r)) for r in responses]), None)
    rows = [{"prompt": "p", "chosen": "a b c", "rejected": "a"}, {"prompt": "p", "chosen": "a b", "rejected": "b"},
            {"prompt": "p", "chosen": "c", "rejected": "c b a"}, {"prompt": "p", "chosen": "a b", "rejected": "b a"}]
    assert evaluator.pairs(rows)["pairs/reward_model_accuracy"] == 0.5
    assert evaluator.pairs(rows[:2])["pairs/reward_model_accuracy"] == 1.0


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 from one unpadded forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_kl_and_dpo_accuracy_equal_plain_loops_over_unpadded_rows(tiny_dir, other_dir, monkeypatch):
    """KL: per row, sum over its response tokens of log pi - log ref, each from a forward over that row alone (no
    padding, default positions); this checks the left padding, position ids and masking of the batched path."""
    evaluator = ev.Evaluator(small(model=tiny_dir, reference=other_dir, max_new_tokens=5))
    policy, reference = evaluator.policy, evaluator.reference
    kept = []
    real_sample = evaluator.sample

    def keep(model, prompts):
        texts, generations = real_sample(model, prompts)
        kept.append(generations)
        return texts, generations

    monkeypatch.setattr(evaluator, "sample", keep)
    rows = ev.synthetic_rows("prompt", 6, 0)
    metrics, _ = evaluator.prompts(rows)

    kls = []
    for gen in kept[0]:
        for b in range(len(gen.sequences)):
            ids = gen.sequences[b][gen.attention_mask[b]].tolist()
            n = int(gen.action_mask[b].sum())
            kls.append(float((full_logprobs(policy, ids) - full_logprobs(reference, ids))[-n:].sum()))
    assert len(kls) == 6 and metrics["objective/kl"] != 0
    assert metrics["objective/kl"] == pytest.approx(sum(kls) / len(kls), abs=1e-4)

    pairs = ev.synthetic_rows("preference", 6, 0)
    encoder = evaluator.encoder
    margins = []
    for row in pairs:
        implicit = []
        for response in (row["chosen"], row["rejected"]):
            prompt_ids, response_ids = encoder.ids(row["prompt"]), encoder.formatter.response_ids(response)
            ids = prompt_ids + response_ids
            n = len(response_ids)
            implicit.append(float((full_logprobs(policy, ids) - full_logprobs(reference, ids))[-n:].sum()))
        margins.append(implicit[0] - implicit[1])
    assert evaluator.pairs(pairs)["pairs/dpo_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))


def test_prompts_and_pairs_from_files(tiny_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("Sort the letters: c a b\nSort the letters: q e b m\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "Sort the letters: c a b", "chosen": "a b c",
                                                      "rejected": "b a c"}) + "\n")
    result = ev.evaluate(small(model=tiny_dir, prompts=str(tmp_path / "prompts.txt"),
                               pairs=str(tmp_path / "pairs.jsonl")))
    assert result["metrics"]["num_prompts"] == 2 and result["metrics"]["num_pairs"] == 1
    assert "judge/score" in result["metrics"]  # every prompt is a sorting prompt: the task's judge applies

    (tmp_path / "other.txt").write_text("Write a poem about the sea.\n")
    other = ev.evaluate(small(model=tiny_dir, prompts=str(tmp_path / "other.txt"), pairs=None))
    assert "judge/score" not in other["metrics"] and other["metrics"]["num_prompts"] == 1
