"""A preference row's `soft_label` (the probability that chosen is preferred) is carried, like `margin`, from
the file through tokenisation to the collator's batch, in every batch layout; bad values name the row."""

import pytest
import torch

from data import DataError, make_collator
from tests.data.conftest import build, write_jsonl

ROWS = [
    {"prompt": "Sort the letters: b a", "chosen": "a b", "rejected": "b a", "soft_label": 0.75, "confidence": 0.5},
    {"prompt": "Sort the letters: d c e", "chosen": "c d e", "rejected": "c e", "soft_label": 1, "confidence": 1.0},
    {"prompt": "Sort the letters: q e b", "chosen": "b e q", "rejected": "b q e", "soft_label": 0.5,
     "confidence": 0.0},
]


@pytest.mark.parametrize("share_prompt", [False, True])
def test_soft_labels_reach_the_batch_in_row_order(tmp_path, tok_bos, share_prompt):
    data = build("preference", write_jsonl(tmp_path / "labelled.jsonl", ROWS), tok_bos, tmp_path)
    assert data.train["soft_label"] == [0.75, 1.0, 0.5]
    assert "confidence" not in data.train.column_names  # other columns are not training data
    collate = make_collator("preference", tok_bos, share_prompt=share_prompt, share_row_tokens=64)
    batch = collate([data.train[i] for i in (2, 0, 1)])
    assert batch["soft_label"].dtype == torch.float32
    assert batch["soft_label"].tolist() == [0.5, 0.75, 1.0]
    assert "margin" not in batch


def test_rows_without_soft_labels_have_no_column(tmp_path, tok_bos):
    rows = [{k: v for k, v in row.items() if k != "soft_label"} for row in ROWS]
    data = build("preference", write_jsonl(tmp_path / "plain.jsonl", rows), tok_bos, tmp_path)
    assert "soft_label" not in data.train.column_names
    assert "soft_label" not in make_collator("preference", tok_bos)([data.train[0]])


@pytest.mark.parametrize("value,problem", [(1.5, "field 'soft_label' is 1.5"), (-0.1, "field 'soft_label' is -0.1"),
                                           ("0.5", "field 'soft_label' is str"), (True, "field 'soft_label' is bool")])
def test_a_bad_soft_label_names_the_row(tmp_path, tok_bos, value, problem):
    rows = [ROWS[0], {**ROWS[1], "soft_label": value}]
    with pytest.raises(DataError, match=rf"line 2: {problem}.*'soft_label' to be a"):
        build("preference", write_jsonl(tmp_path / "bad.jsonl", rows), tok_bos, tmp_path)


def test_soft_label_on_some_rows_only_is_refused(tmp_path, tok_bos):
    rows = [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "soft_label"}]
    with pytest.raises(DataError, match="line 2: 'soft_label' is set on some rows and not on others"):
        build("preference", write_jsonl(tmp_path / "some.jsonl", rows), tok_bos, tmp_path)
