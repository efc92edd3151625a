"""Caching keyed by config, files and tokenizer; parallel tokenisation; the saved report."""

import json
import os

from data import DataConfig, DataReport, build_datasets
from data.build import data_fingerprint
from data.report import percentiles
from tests.data.conftest import build, write_jsonl

ROWS = [{"prompt": f"Sort the letters: {c} a", "completion": f"a {c}"} for c in "bcdefghijklmnopqrstu"]


def test_second_build_comes_from_the_cache(tmp_path, tok_bos):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    first = build("sft", path, tok_bos, tmp_path)
    second = build("sft", path, tok_bos, tmp_path)
    assert not first.report.cached and second.report.cached
    assert first.train["input_ids"] == second.train["input_ids"]
    assert second.report.splits == first.report.splits


def test_cache_key_follows_config_files_and_tokenizer(tmp_path, tok_bos, tok_template_bos):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path))
    base = data_fingerprint("sft", cfg, tok_bos)
    assert data_fingerprint("sft", DataConfig(path=str(path), cache_dir=str(tmp_path), num_proc=4), tok_bos) == base
    assert data_fingerprint("sft", DataConfig(path=str(path), max_length=64), tok_bos) != base
    assert data_fingerprint("sft", cfg, tok_template_bos) != base
    assert data_fingerprint("preference", cfg, tok_bos) != base
    write_jsonl(path, ROWS[:-1])
    os.utime(path, ns=(1, 1))
    assert data_fingerprint("sft", cfg, tok_bos) != base


def test_parallel_tokenisation_matches_serial(tmp_path, tok_bos):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    serial = build("sft", path, tok_bos, tmp_path / "a", num_proc=1)
    parallel = build("sft", path, tok_bos, tmp_path / "b", num_proc=2)
    assert serial.train["input_ids"] == parallel.train["input_ids"]
    assert serial.train["labels"] == parallel.train["labels"]


def test_report_is_printed_and_saved(tmp_path, tok_bos, capsys):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), eval_fraction=0.1)
    bundle = build_datasets("sft", cfg, tok_bos, report_dir=tmp_path / "run")
    printed = capsys.readouterr().out
    assert "train: read 18, kept 18, dropped: none" in printed
    assert "eval: read 2, kept 2" in printed
    saved = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert saved == bundle.report.as_dict()
    assert DataReport.from_dict(saved).format() == bundle.report.format()
    assert set(saved["splits"]["train"]) >= {"rows_read", "dropped", "prompt_tokens", "response_tokens",
                                            "prompt_truncated", "response_truncated"}


def test_nearest_rank_percentiles():
    # 10 values: p50 -> 5th smallest, p90 -> 9th, p99 and max -> 10th
    assert percentiles(list(range(1, 11))) == {"p50": 5.0, "p90": 9.0, "p99": 10.0, "p100": 10.0}
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p100": 0.0}


def test_synthetic_cache_follows_the_task_version(tmp_path, tok_bos, monkeypatch):
    from data import synthetic

    cfg = DataConfig(path="synthetic", cache_dir=str(tmp_path))
    before = data_fingerprint("sft", cfg, tok_bos)
    monkeypatch.setattr(synthetic, "TASK_VERSION", synthetic.TASK_VERSION + 1)
    assert data_fingerprint("sft", cfg, tok_bos) != before
