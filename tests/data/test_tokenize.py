"""Token boundaries: BOS once, labels on exactly the response + EOS, truncation on the right side."""

import pytest

from data import DataConfig
from data.tiny_tokenizer import build_tokenizer
from data.tokenize import Formatter
from tests.data.conftest import build, write_jsonl

# responses whose characters could merge across a character-level split
PAIRS = [
    ("Sort the letters: q e b m", "b e m q"),
    ("Say hello twice.", " hello hello"),
    ("Write two lines.", "line one\nline two\n"),
    ("Unicode?", "café – ok ✓"),
    ("Question with trailing space ", "answer"),
]
TOKENIZERS = ["tok_bos", "tok_template_bos", "tok_plain"]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_response_tokens_decode_to_response_plus_eos(tmp_path, request, name):
    tok = request.getfixturevalue(name)
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS]
    bundle = build("sft", write_jsonl(tmp_path / "rows.jsonl", rows), tok, tmp_path)
    for (prompt, completion), r in zip(PAIRS, bundle.train, strict=True):
        ids, labels = r["input_ids"], r["labels"]
        n_prompt = labels.index(next(lab for lab in labels if lab != -100))
        assert all(lab == -100 for lab in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[n_prompt:]) == completion + tok.eos_token
        assert ids[-1] == tok.eos_token_id
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        assert prompt in tok.decode(ids[:n_prompt])


@pytest.mark.parametrize("name", TOKENIZERS)
def test_preference_and_prompt_ids_share_the_prompt(tmp_path, request, name):
    tok = request.getfixturevalue(name)
    rows = [{"prompt": p, "chosen": c, "rejected": c + " no", "answer": c} for p, c in PAIRS]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    pref = build("preference", path, tok, tmp_path)
    prompts = build("prompt", path, tok, tmp_path)
    for (_, completion), r, p in zip(PAIRS, pref.train, prompts.train, strict=True):
        n = len(p["prompt_input_ids"])
        assert r["chosen_input_ids"][:n] == r["rejected_input_ids"][:n] == p["prompt_input_ids"]
        assert tok.decode(r["chosen_labels"][n:]) == completion + tok.eos_token
        assert tok.decode(r["rejected_labels"][n:]) == completion + " no" + tok.eos_token
        assert all(lab == -100 for lab in r["chosen_labels"][:n])


def test_plain_format_without_bos_from_a_tokenizer_that_adds_none(tmp_path, tok_template_bos):
    rows = [{"prompt": "Sort the letters: b a", "completion": "a b"}]
    r = build("sft", write_jsonl(tmp_path / "r.jsonl", rows), tok_template_bos, tmp_path, template="plain").train[0]
    assert tok_template_bos.decode(r["input_ids"]) == "Question: Sort the letters: b a\n\nAnswer: a b</s>"


def test_plain_format_of_a_tokenizer_without_chat_template(tmp_path, tok_plain):
    rows = [{"prompt": "Sort the letters: b a", "completion": "a b"}]
    r = build("sft", write_jsonl(tmp_path / "r.jsonl", rows), tok_plain, tmp_path).train[0]
    assert tok_plain.decode(r["input_ids"]) == "<s>Question: Sort the letters: b a\n\nAnswer: a b</s>"


def test_bos_once_when_tokenizer_and_template_both_write_it(tmp_path):
    tok = build_tokenizer(add_bos=True, template_bos=True)
    assert tok("x").input_ids[0] == tok.bos_token_id
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).startswith("<s>")
    rows = [{"prompt": "Sort the letters: b a", "completion": "a b"}]
    r = build("sft", write_jsonl(tmp_path / "r.jsonl", rows), tok, tmp_path).train[0]
    assert r["input_ids"].count(tok.bos_token_id) == 1 and r["input_ids"][0] == tok.bos_token_id


def test_named_and_raw_templates(tmp_path, tok_bos):
    rows = [{"prompt": "Sort the letters: b a", "completion": "a b"}]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    chatml = build("sft", path, tok_bos, tmp_path, template="chatml").train[0]
    assert tok_bos.decode(chatml["input_ids"]) == (
        "<s><|im_start|>user\nSort the letters: b a<|im_end|>\n<|im_start|>assistant\na b</s>"
    )
    raw = build("sft", path, tok_bos, tmp_path, template="raw").train[0]
    assert tok_bos.decode(raw["input_ids"]) == "<s>Sort the letters: b aa b</s>"


def test_train_on_prompt_labels_everything(tmp_path, tok_bos):
    rows = [{"prompt": "Sort the letters: b a", "completion": "a b"}]
    r = build("sft", write_jsonl(tmp_path / "r.jsonl", rows), tok_bos, tmp_path, train_on_prompt=True).train[0]
    assert r["labels"] == r["input_ids"]


def test_prompt_cut_from_the_left_keeping_bos_response_from_the_right(tmp_path, tok_bos):
    long_prompt = "Sort the letters: " + " ".join("abcdefghijklmnopqrst")
    long_answer = " ".join("abcdefghijklmnopqrst")
    rows = [{"prompt": long_prompt, "completion": long_answer}, {"prompt": "Sort the letters: b a", "completion": "a b"}]
    bundle = build("sft", write_jsonl(tmp_path / "r.jsonl", rows), tok_bos, tmp_path, max_length=24,
                   max_prompt_length=12, template="raw")
    r = bundle.train[0]
    assert len(r["input_ids"]) == 24
    assert r["input_ids"][0] == tok_bos.bos_token_id
    prompt_text = tok_bos.decode(r["input_ids"][:12])
    assert prompt_text == "<s> j k l m n o p q r s t"
    assert tok_bos.decode([t for t in r["labels"] if t != -100]) == "a b c d e f g h i j k l"
    split = bundle.report.splits["train"]
    assert split.prompt_truncated == 0.5 and split.response_truncated == 0.5
    # lengths before truncation: BOS + "Sort the letters:" (4) + 20 letters
    assert split.prompt_tokens["p100"] == 25


def test_rows_without_room_for_a_response_token_are_dropped_and_counted(tmp_path, tok_bos):
    rows = [{"prompt": "Sort the letters: b a", "completion": "a b"}] * 3 + [
        {"prompt": "Sort the letters: " + " ".join("abcdefghijklmnop"), "completion": "a"}
    ]
    pref_rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "x"} for r in rows]
    bundle = build("sft", write_jsonl(tmp_path / "r.jsonl", rows), tok_bos, tmp_path, max_length=16,
                   max_prompt_length=None, template="raw")
    assert len(bundle.train) == 3
    assert bundle.report.splits["train"].dropped == {"no_room_for_response": 1}
    assert bundle.report.splits["train"].rows_read == 4
    pref = build("preference", write_jsonl(tmp_path / "p.jsonl", pref_rows), tok_bos, tmp_path, max_length=16,
                 max_prompt_length=None, template="raw")
    assert pref.report.splits["train"].dropped == {"no_room_for_response": 1}


def test_formatter_describes_bos_handling(tok_bos, tok_template_bos):
    assert Formatter(DataConfig(), tok_bos).adds_bos
    assert not Formatter(DataConfig(), tok_template_bos).adds_bos
