import json
from pathlib import Path

import pytest

from data import DataConfig, build_datasets
from data.tiny_tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tok_bos(tmp_path_factory):
    """Adds BOS when encoding; its chat template does not write BOS."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_bos"), add_bos=True, chat_template=True)


@pytest.fixture(scope="session")
def tok_template_bos(tmp_path_factory):
    """Adds nothing when encoding; its chat template writes BOS."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_template_bos"), add_bos=False, chat_template=True)


@pytest.fixture(scope="session")
def tok_plain(tmp_path_factory):
    """Adds BOS when encoding; no chat template (plain prompt format)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_plain"), add_bos=True, chat_template=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(family: str, path, tokenizer, tmp_path: Path, **overrides):
    """build_datasets with a private cache, no eval split unless asked, and no printing."""
    fields = {"path": str(path), "cache_dir": str(tmp_path / "cache"), "eval_fraction": 0.0, **overrides}
    return build_datasets(family, DataConfig(**fields), tokenizer, log=None)
