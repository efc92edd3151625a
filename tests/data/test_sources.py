"""Every file type and split rule, on small files written here."""

import csv
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import DataConfig, DataError
from data.sources import load_splits, select_splits
from tests.data.conftest import build, write_jsonl

ROWS = [{"prompt": f"Sort the letters: {a} {b}", "completion": f"{min(a, b)} {max(a, b)}"} for a, b in
        [("b", "a"), ("d", "c"), ("f", "e"), ("h", "g"), ("j", "i"), ("l", "k")]]


def _prompts(split):
    return [row["prompt"] for row in split.rows]


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_file_type_reads_the_same_rows(tmp_path, suffix, tok_bos):
    path = _write(tmp_path / f"rows{suffix}", ROWS)
    splits = load_splits(DataConfig(path=str(path)), "sft")
    assert list(splits) == ["train"]
    assert [dict(r) for r in splits["train"].rows] == ROWS
    bundle = build("sft", path, tok_bos, tmp_path)
    assert len(bundle.train) == len(ROWS)


def test_save_to_disk_directory(tmp_path, tok_bos):
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:4]), "test": datasets.Dataset.from_list(ROWS[4:])}
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    bundle = build("sft", tmp_path / "saved", tok_bos, tmp_path)
    assert (len(bundle.train), len(bundle.eval)) == (4, 2)


def test_directory_of_split_files(tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", ROWS[:5])
    write_jsonl(tmp_path / "d" / "validation.jsonl", ROWS[5:])
    splits = load_splits(DataConfig(path=str(tmp_path / "d")), "sft")
    assert sorted(splits) == ["train", "validation"]
    train, eval_ = select_splits(DataConfig(path=str(tmp_path / "d")), splits)
    assert (len(train), len(eval_)) == (5, 1)


def test_question_answer_json_with_any_key_case(tmp_path, tok_bos):
    data = {
        "train": [{"Question": "Sort the letters: b a", "Answer": "a b"}, {"QUESTION": "Sort the letters: d c",
                                                                           "answer": "c d"}],
        "test": [{"question": "Sort the letters: f e", "ANSWER": "e f"}],
    }
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(data))
    bundle = build("sft", path, tok_bos, tmp_path)
    assert bundle.report.row_format == "qa"
    assert (len(bundle.train), len(bundle.eval)) == (2, 1)
    labels = [t for t in bundle.eval[0]["labels"] if t != -100]
    assert tok_bos.decode(labels) == "e f</s>"


def test_json_lines_inside_a_json_file(tmp_path):
    path = tmp_path / "rows.json"
    write_jsonl(path, ROWS[:2])
    assert len(load_splits(DataConfig(path=str(path)), "sft")["train"]) == 2


def test_named_eval_split_and_auto_test_split(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": ROWS[:3], "test": ROWS[3:5], "dev": ROWS[5:]}))
    splits = load_splits(DataConfig(path=str(path)), "sft")
    _, eval_auto = select_splits(DataConfig(path=str(path)), splits)
    assert _prompts(eval_auto) == [r["prompt"] for r in ROWS[3:5]]
    _, eval_named = select_splits(DataConfig(path=str(path), eval_split="dev"), splits)
    assert _prompts(eval_named) == [ROWS[5]["prompt"]]


def test_held_out_fraction_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS * 5)
    cfg = DataConfig(path=str(path), eval_fraction=0.2, seed=3)
    train, eval_ = select_splits(cfg, load_splits(cfg, "sft"))
    assert (len(train), len(eval_)) == (24, 6)
    assert sorted(train.lines + eval_.lines) == list(range(1, 31))
    again_train, _ = select_splits(cfg, load_splits(cfg, "sft"))
    assert again_train.lines == train.lines
    other, _ = select_splits(DataConfig(path=str(path), eval_fraction=0.2, seed=4), load_splits(cfg, "sft"))
    assert other.lines != train.lines


def test_sample_ratio_then_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS * 10)
    cfg = DataConfig(path=str(path), eval_fraction=0.0, sample_ratio=0.5)
    assert len(select_splits(cfg, load_splits(cfg, "sft"))[0]) == 30
    cfg = DataConfig(path=str(path), eval_fraction=0.0, sample_ratio=0.5, max_samples=7)
    train, eval_ = select_splits(cfg, load_splits(cfg, "sft"))
    assert len(train) == 7 and eval_ is None


def test_synthetic_path_is_deterministic(tmp_path, tok_bos):
    a = build("preference", "synthetic", tok_bos, tmp_path / "a", synthetic_size=60, eval_fraction=0.05)
    b = build("preference", "synthetic", tok_bos, tmp_path / "b", synthetic_size=60, eval_fraction=0.05)
    assert a.train["chosen_input_ids"] == b.train["chosen_input_ids"]
    assert (len(a.train), len(a.eval)) == (60, 50)


def test_hub_name_goes_to_load_dataset_with_subset(tmp_path, tok_bos, monkeypatch):
    """The hub branch, with `datasets.load_dataset` replaced by a local stand-in (no network in tests)."""
    calls = []

    def fake_load_dataset(name, subset=None):
        calls.append((name, subset))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]),
                                     "validation": datasets.Dataset.from_list(ROWS[4:])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bundle = build("sft", "someorg/sorting", tok_bos, tmp_path, subset="easy")
    assert calls == [("someorg/sorting", "easy")]
    assert (len(bundle.train), len(bundle.eval)) == (4, 2)


def test_hub_failure_says_what_was_tried(tmp_path, tok_bos, monkeypatch):
    def offline(name, subset=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'someorg/missing': it is not a local file or directory.*ConnectionError"):
        build("sft", "someorg/missing", tok_bos, tmp_path)
