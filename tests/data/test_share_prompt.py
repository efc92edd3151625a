"""Shared-prompt preference batches: one row per pair, prompt once, a mask that keeps the responses apart."""

from __future__ import annotations

import pytest
import torch

from data import make_collator
from data.collators import _fill_rows, share_prompt_batch

M = -100


def test_mask_positions_and_maps_of_two_small_pairs():
    """Pair 0: prompt [5, 6], chosen response [7, 8], rejected response [9] -> row [5, 6, 7, 8, 9] with
    positions [0, 1, 2, 3, 2]: the rejected token 9 (query 4) sees the prompt (keys 0, 1) and itself, never
    the chosen 7, 8. Pair 1: prompt [5], chosen [6], rejected [7] -> row [5, 6, 7] padded to 5; the two
    padding positions see themselves only, and no token sees them."""
    chosen = [([5, 6, 7, 8], [M, M, 7, 8]), ([5, 6], [M, 6])]
    rejected = [([5, 6, 9], [M, M, 9]), ([5, 7], [M, 7])]
    batch = share_prompt_batch(chosen + rejected, pad_id=0)

    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 0, 0]]
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].shape == (2, 1, 5, 5)
    assert batch["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    assert batch["attention_mask"][1, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]
    # the ordinary layout's labels, rows chosen_0, chosen_1, rejected_0, rejected_1, and where each token sits
    assert batch["labels"].tolist() == [[M, M, 7, 8], [M, 6, M, M], [M, M, 9, M], [M, 7, M, M]]
    assert batch["token_positions"].tolist() == [[0, 1, 2, 3], [0, 1, -1, -1], [0, 1, 4, -1], [0, 2, -1, -1]]
    assert batch["token_rows"].tolist() == [0, 1, 0, 1]


def test_two_pairs_in_one_row_see_nothing_of_each_other():
    """The same two pairs with rows of up to 8 tokens: pair 0 (5 tokens) at offset 0, pair 1 (3 tokens) at
    offset 5, positions restarting at 0; the mask is the two pairs' own masks on its diagonal."""
    chosen = [([5, 6, 7, 8], [M, M, 7, 8]), ([5, 6], [M, 6])]
    rejected = [([5, 6, 9], [M, M, 9]), ([5, 7], [M, 7])]
    alone = share_prompt_batch(chosen + rejected, pad_id=0)
    batch = share_prompt_batch(chosen + rejected, pad_id=0, row_tokens=8)

    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1]]
    mask = batch["attention_mask"][0, 0]
    assert torch.equal(mask[:5, :5], alone["attention_mask"][0, 0])
    assert torch.equal(mask[5:, 5:], alone["attention_mask"][1, 0, :3, :3])
    assert not mask[:5, 5:].any() and not mask[5:, :5].any()
    assert batch["token_rows"].tolist() == [0, 0, 0, 0]
    assert batch["token_positions"].tolist() == [[0, 1, 2, 3], [5, 6, -1, -1], [0, 1, 4, -1], [5, 7, -1, -1]]
    assert torch.equal(batch["labels"], alone["labels"])
    # a limit the two shortest pairs do not fit in keeps one pair per row
    assert torch.equal(share_prompt_batch(chosen + rejected, pad_id=0, row_tokens=7)["input_ids"], alone["input_ids"])


def test_rows_are_filled_to_the_fewest_padded_positions():
    # 150 tokens in rows of up to 60: 3 rows, longest first into the emptiest row (50 | 40 + 10 | 30 + 20),
    # 3 x 50 = 150 positions against 4 x 50 = 200 with 4 rows and 5 x 50 = 250 with one item per row
    assert _fill_rows([30, 50, 20, 40, 10], 60) == [(2, 0), (0, 0), (2, 30), (1, 0), (1, 40)]
    # an item longer than the limit still gets a row, and the others fill theirs
    assert _fill_rows([70, 20, 30], 60) == [(0, 0), (1, 30), (1, 0)]
    # equal lengths: no row count saves 10% of the positions, so one item per row, in order; likewise a limit of 0
    assert _fill_rows([40] * 4, 128) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert _fill_rows([30, 50, 20], 0) == [(0, 0), (1, 0), (2, 0)]
    # positions are counted after rounding to pad_to_multiple_of: 2 rows of 66 are 2 x 66 = 132 positions against
    # 3 x 64 = 192, but rounded to 64 they are 2 x 128 = 256 against 3 x 64 = 192
    assert _fill_rows([64, 33, 33], 128) == [(0, 0), (1, 0), (1, 33)]
    assert _fill_rows([64, 33, 33], 128, multiple=64) == [(0, 0), (1, 0), (2, 0)]


def _pairs(n: int) -> list[dict]:
    """Pairs with prompts of different lengths, responses of different lengths, and first response tokens
    in common (pair 2), so the shared prefix is longer than the prompt there."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, 50, (3 + 4 * i,), generator=g).tolist()
        chosen = torch.randint(3, 50, (2 + i % 3,), generator=g).tolist()
        rejected = torch.randint(3, 50, (1 + (i * 2) % 5,), generator=g).tolist()
        if i == 2:
            rejected = chosen[:1] + rejected
        rows.append({
            "chosen_input_ids": prompt + chosen, "chosen_labels": [M] * len(prompt) + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": [M] * len(prompt) + rejected,
            "margin": float(i),
        })
    return rows


# pairs of 6, 13, 20 and 19 tokens, rows rounded up to 4: with rows of up to 40 or 1000 tokens, three rows of
# 20 (20 | 19 | 13 + 6) tie with one of 60 on positions, and the shorter rows win the tie
@pytest.mark.parametrize("row_tokens, n_rows", [(0, 4), (40, 3), (1000, 3)])
def test_every_token_keeps_its_id_position_and_visible_tokens(tok_bos, row_tokens, n_rows):
    rows = _pairs(4)
    ordinary = make_collator("preference", tok_bos, pad_to_multiple_of=4)(rows)
    shared = make_collator("preference", tok_bos, pad_to_multiple_of=4, share_prompt=True,
                           share_row_tokens=row_tokens)(rows)

    B = len(rows)
    assert shared["input_ids"].shape[0] == n_rows and shared["input_ids"].shape[1] % 4 == 0
    row_of = shared["token_rows"]
    assert torch.equal(row_of[:B], row_of[B:]) and set(row_of.tolist()) == set(range(n_rows))
    assert torch.equal(shared["labels"], ordinary["labels"])
    assert torch.equal(shared["margin"], ordinary["margin"])
    assert shared["input_ids"].numel() < ordinary["input_ids"].numel()
    for r in range(2 * B):
        length = int(ordinary["attention_mask"][r].sum())
        where = shared["token_positions"][r]
        assert (where[:length] >= 0).all() and (where[length:] == -1).all()
        where, row = where[:length], int(row_of[r])
        assert torch.equal(shared["input_ids"][row, where], ordinary["input_ids"][r, :length])
        assert torch.equal(shared["position_ids"][row, where], torch.arange(length))
        # token t sees exactly the tokens 0..t of its own sequence, nothing of another pair in the row
        visible = shared["attention_mask"][row, 0][where][:, where]
        assert torch.equal(visible, torch.ones(length, length, dtype=torch.bool).tril())
        assert int(shared["attention_mask"][row, 0][where].sum()) == length * (length + 1) // 2


def test_packing_keeps_the_packed_layout(tok_bos):
    rows = _pairs(3)
    packed = make_collator("preference", tok_bos, packing=True)(rows)
    both = make_collator("preference", tok_bos, packing=True, share_prompt=True)(rows)
    assert "token_positions" not in both
    assert all(torch.equal(packed[k], both[k]) for k in ("input_ids", "labels", "position_ids", "seq_lens"))


def test_sft_and_prompt_batches_ignore_it(tok_bos):
    sft_rows = [{"input_ids": [5, 6, 7], "labels": [M, 6, 7]}, {"input_ids": [5, 8], "labels": [M, 8]}]
    plain, shared = (make_collator("sft", tok_bos, share_prompt=s)(sft_rows) for s in (False, True))
    assert plain.keys() == shared.keys() and all(torch.equal(plain[k], shared[k]) for k in plain)
