import pytest

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
