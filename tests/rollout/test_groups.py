"""Group statistics, DAPO's group and overlong filters, and the group layout of repeated prompts."""

import math

import pytest
import torch

from rollout.groups import (
    as_groups,
    group_rows,
    group_stats,
    informative_groups,
    overlong_filter,
    repeat_prompts,
)

# Four groups of G = 4, solved at 1.0:
#   g0 [1, 0, 0, 1]  mixed:       mean 1/2, Bessel variance 4 * (1/2)^2 / 3 = 1/3, std sqrt(1/3)
#   g1 [1, 1, 1, 1]  all solved:  tied, std 0
#   g2 [0, 0, 0, 0]  none solved: tied, std 0
#   g3 [.5, .5, .5, .5]  a tie below the threshold: none solved, std 0
SCORES = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5])


def test_group_stats_by_hand():
    """reward_mean 8/16; reward_std (sqrt(1/3) + 0 + 0 + 0) / 4; tied 3 of 4; all solved g1 only (1/4);
    none solved g2 and g3 (2/4)."""
    stats = group_stats(SCORES, 4, solved_threshold=1.0)
    assert stats["groups/reward_mean"].item() == 0.5
    assert stats["groups/reward_std"].item() == pytest.approx(math.sqrt(1 / 3) / 4, rel=1e-12)
    assert stats["groups/tied"].item() == 0.75
    assert stats["groups/all_solved"].item() == 0.25
    assert stats["groups/none_solved"].item() == 0.5


def test_group_std_is_torch_std_per_group():
    scores = torch.randn(5 * 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = scores.view(5, 6).std(dim=1, unbiased=True).mean()
    torch.testing.assert_close(group_stats(scores, 6)["groups/reward_std"], expected, rtol=1e-12, atol=0)


def test_solved_metrics_need_a_threshold():
    assert set(group_stats(SCORES, 4)) == {"groups/reward_mean", "groups/reward_std", "groups/tied"}


def test_group_stats_leave_invalid_rows_out():
    """G = 3, threshold 2. g0 [2, 4, (9)]: mean 3, std sqrt(((2-3)^2 + (4-3)^2) / 1) = sqrt(2), all solved.
    g1 [5, (5), 1]: std sqrt((2^2 + 2^2) / 1) = 2 sqrt(2), neither. g2 has no valid row (the Scorer's 0s):
    in no share. reward_mean (2+4+5+1)/4 = 3; reward_std (sqrt(2) + 2 sqrt(2)) / 2; tied 0 of 2; all solved
    1 of 2; none solved 0 of 2. Counting the invalid rows would give a mean of 26/9 and g2 as tied."""
    scores = torch.tensor([2.0, 4, 9, 5, 5, 1, 0, 0, 0])
    valid = torch.tensor([True, True, False, True, False, True, False, False, False])
    stats = group_stats(scores, 3, solved_threshold=2.0, valid=valid)
    assert stats["groups/reward_mean"].item() == 3.0
    assert stats["groups/reward_std"].item() == pytest.approx(1.5 * math.sqrt(2), rel=1e-12)
    assert stats["groups/tied"].item() == 0.0
    assert stats["groups/all_solved"].item() == 0.5
    assert stats["groups/none_solved"].item() == 0.0
    assert group_stats(scores, 3)["groups/tied"].item() == pytest.approx(1 / 3)


def test_informative_groups_drop_ties_and_groups_of_fewer_than_two_valid_rows():
    """G = 3. g0 [1, 0, 0] differs; g1 [1, (0), 1] ties once its skipped row is left out; g2 [.3, .3, .3]
    ties; g3 [1, (0), (0)] has one valid row; g4 [.5, .5001, .5] differs by 1e-4, a tie within atol=1e-3."""
    scores = torch.tensor([1, 0, 0, 1, 0, 1, 0.3, 0.3, 0.3, 1, 0, 0, 0.5, 0.5001, 0.5])
    valid = torch.ones(15, dtype=torch.bool)
    valid[[4, 10, 11]] = False
    assert informative_groups(scores, 3, valid=valid).tolist() == [True, False, False, False, True]
    assert informative_groups(scores, 3, valid=valid, atol=1e-3).tolist() == [True, False, False, False, False]
    assert informative_groups(scores, 3).tolist() == [True, True, False, True, True]  # every row counted


def test_validity_flags_may_sit_on_another_device_than_the_scores():
    """The scorer's flags stay on the CPU while the scores sit with the sequences on the GPU (GRPO failed its
    first rollout on CUDA that way). The meta device stands in for the GPU: the flags follow the scores."""
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5], device="meta")
    out = informative_groups(scores, 2, valid=torch.ones(4, dtype=torch.bool))
    assert out.device == scores.device and out.shape == (2,)


def test_group_rows_keep_whole_groups():
    assert group_rows(torch.tensor([True, False, True]), 2).tolist() == [True, True, False, False, True, True]


def test_repeat_prompts_repeats_each_prompt_row_g_times_in_a_row():
    batch = {"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
             "prompt": ["p0", "p1"], "extras": [{"answer": "a0"}, {"answer": "a1"}], "unused": None}
    out = repeat_prompts(batch, 3)
    assert out["input_ids"].tolist() == [[0, 5, 6]] * 3 + [[7, 8, 9]] * 3
    assert out["attention_mask"].tolist() == [[0, 1, 1]] * 3 + [[1, 1, 1]] * 3
    assert out["prompt"] == ["p0", "p0", "p0", "p1", "p1", "p1"]
    assert [row["answer"] for row in out["extras"]] == ["a0", "a0", "a0", "a1", "a1", "a1"]
    assert out["unused"] is None
    assert as_groups(out["input_ids"], 3)[1].tolist() == [[7, 8, 9]] * 3  # group g holds prompt g
    with pytest.raises(ValueError, match="disagree on the number of prompts"):
        repeat_prompts({"input_ids": batch["input_ids"], "prompt": ["p0"]}, 2)


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="10 rows do not split into groups of 4"):
        group_stats(torch.zeros(10), 4)


def test_overlong_filter_zeroes_the_rows_without_eos():
    action_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    no_eos = torch.tensor([False, True, False])
    assert overlong_filter(action_mask, no_eos).tolist() == [[True, True, False, False], [False] * 4,
                                                             [True, True, True, False]]
