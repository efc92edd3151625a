"""Each bad input gives an error that names the file, the row, the keys it has and the fix."""

import copy
import json

import pytest

from data import DataError, make_collator
from tests.data.conftest import build, write_jsonl

GOOD = {"prompt": "Sort the letters: b a", "completion": "a b"}


def _build_rows(tmp_path, tok, rows, family="sft", **cfg):
    return build(family, write_jsonl(tmp_path / "rows.jsonl", rows), tok, tmp_path, **cfg)


def test_missing_file(tmp_path, tok_bos):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl.*Check data\.path"):
        build("sft", tmp_path / "nope.jsonl", tok_bos, tmp_path)


def test_unparsable_json_line_names_the_line(tmp_path, tok_bos):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"prompt": "x", "completion": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: unparsable JSON"):
        build("sft", path, tok_bos, tmp_path)


def test_unparsable_json_file_and_wrong_top_level(tmp_path, tok_bos):
    path = tmp_path / "bad.json"
    path.write_text('{"train": [\n  {"prompt": "x",}\n]}')
    with pytest.raises(DataError, match=r"bad\.json, line 2: unparsable JSON"):
        build("sft", path, tok_bos, tmp_path)
    path.write_text('{"rows": 3}')
    with pytest.raises(DataError, match=r"top-level object has keys \['rows'\]; expected a list of rows"):
        build("sft", path, tok_bos, tmp_path)


def test_missing_key_names_file_line_keys_and_expected(tmp_path, tok_bos):
    rows = [GOOD, GOOD, {"prompt": "Sort the letters: d c", "answer": "c d"}]
    with pytest.raises(DataError) as e:
        _build_rows(tmp_path, tok_bos, rows)
    message = str(e.value)
    assert "rows.jsonl, line 3" in message
    assert "missing key(s) ['completion']" in message
    assert "has keys ['answer', 'prompt']" in message
    assert "expected keys ['prompt', 'completion']" in message


def test_undetectable_format_lists_the_accepted_keys(tmp_path, tok_bos):
    with pytest.raises(DataError, match=r"cannot tell the sft format from the keys \['body'\].*prompt/completion"):
        _build_rows(tmp_path, tok_bos, [{"body": "x"}])


def test_non_string_field(tmp_path, tok_bos):
    with pytest.raises(DataError, match=r"line 2: field 'completion' is int.*expected 'completion' to be a string"):
        _build_rows(tmp_path, tok_bos, [GOOD, {"prompt": "Sort the letters: b a", "completion": 12}])


@pytest.mark.parametrize("field", ["prompt", "completion"])
def test_empty_prompt_or_response(tmp_path, tok_bos, field):
    row = {**GOOD, field: "   "}
    with pytest.raises(DataError, match=rf"line 1: field '{field}' is empty.*Remove the row or fill the field"):
        _build_rows(tmp_path, tok_bos, [row])


def test_bad_messages(tmp_path, tok_bos):
    no_assistant = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match=r"'messages' has no assistant turn \(roles \['user'\]\)"):
        _build_rows(tmp_path, tok_bos, [no_assistant])
    not_strings = {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match=r"messages\[0\] has keys \['content', 'role'\] with role str and content list"):
        _build_rows(tmp_path, tok_bos, [not_strings])


@pytest.mark.parametrize(
    "prompt, marker",
    [
        ("<|user|>\nSort the letters: b a</s>\n<|assistant|>\n", "<|user|>"),
        ("<s>Sort the letters: b a", "<s>"),
    ],
)
def test_template_applied_twice(tmp_path, tok_bos, prompt, marker):
    with pytest.raises(DataError) as e:
        _build_rows(tmp_path, tok_bos, [{"prompt": prompt, "completion": "a b"}])
    message = str(e.value)
    assert f"already contains template markup {marker!r}" in message
    assert "applied twice" in message and "data.template='raw'" in message


def test_plain_format_applied_twice(tmp_path, tok_plain):
    rows = [{"prompt": "Question: Sort the letters: b a\n\nAnswer: ", "completion": "a b"}]
    with pytest.raises(DataError, match=r"already contains template markup '\\n\\nAnswer:'"):
        _build_rows(tmp_path, tok_plain, rows)


@pytest.mark.parametrize("bos", ["", "<s>"])
def test_templated_data_is_accepted_raw(tmp_path, tok_bos, bos):
    rows = [{"prompt": bos + "<|user|>\nSort the letters: b a</s>\n<|assistant|>\n", "completion": "a b"}]
    r = _build_rows(tmp_path, tok_bos, rows, template="raw").train[0]
    assert r["input_ids"].count(tok_bos.bos_token_id) == 1 and r["input_ids"][0] == tok_bos.bos_token_id
    assert tok_bos.decode(r["input_ids"]) == "<s><|user|>\nSort the letters: b a</s>\n<|assistant|>\na b</s>"


def test_template_writing_bos_twice(tmp_path, tok_bos):
    template = "{{ bos_token }}{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match=r"writes BOS \('<s>'\) twice"):
        _build_rows(tmp_path, tok_bos, [GOOD], template=template)


def test_response_template_not_found(tmp_path, tok_bos):
    rows = [{"text": "### Q: sort b a\n### A: a b"}, {"text": "### Q: sort d c\nA: c d"}]
    with pytest.raises(DataError) as e:
        _build_rows(tmp_path, tok_bos, rows, response_template="### A:")
    message = str(e.value)
    assert "rows.jsonl, line 2: response template '### A:' not found" in message
    assert "has keys ['text']" in message and "Fix data.response_template" in message


def test_tokenizer_without_pad_token(tmp_path, tok_bos):
    tok = copy.deepcopy(tok_bos)
    tok.pad_token = None
    with pytest.raises(DataError, match=r"has no pad token.*add_special_tokens\(\{'pad_token': '<pad>'\}\)"):
        _build_rows(tmp_path, tok, [GOOD])
    with pytest.raises(DataError, match="has no pad token"):
        make_collator("sft", tok)


def test_pad_equal_to_eos_breaks_reward_placement(tmp_path, tok_bos):
    tok = copy.deepcopy(tok_bos)
    tok.pad_token = tok.eos_token
    rows = [{"prompt": "Sort the letters: b a", "chosen": "a b", "rejected": "b a"}]
    pairs = _build_rows(tmp_path, tok, rows, family="preference").train
    with pytest.raises(DataError, match=r"same token for pad and EOS \('</s>'.*score lands before the EOS"):
        make_collator("preference", tok)
    with pytest.raises(DataError, match="distinct pad token"):
        make_collator("prompt", tok)
    # labels and attention masks never depend on the pad id: fine for SFT and, when asked, for DPO
    batch = make_collator("preference", tok, allow_pad_as_eos=True)(list(pairs))
    assert batch["labels"][0].tolist()[-1] == tok.eos_token_id
    assert len(_build_rows(tmp_path, tok, [GOOD]).train) == 1
    make_collator("sft", tok)


def test_chosen_equal_to_rejected_is_dropped_and_counted(tmp_path, tok_bos):
    rows = [
        {"prompt": "Sort the letters: b a", "chosen": "a b", "rejected": "b a"},
        {"prompt": "Sort the letters: d c", "chosen": "c d", "rejected": "c d"},
    ]
    bundle = _build_rows(tmp_path, tok_bos, rows, family="preference")
    assert len(bundle.train) == 1
    assert bundle.report.splits["train"].dropped == {"chosen_equals_rejected": 1}
    assert "chosen_equals_rejected 1" in bundle.report.format()


def test_passthrough_field_with_two_types(tmp_path, tok_bos):
    rows = [{"prompt": "Sort the letters: b a", "answer": "a b"}, {"prompt": "Sort the letters: d c", "answer": 7}]
    with pytest.raises(DataError, match=r"rows\.jsonl, line 2: field 'answer' is number here but str in .*line 1"):
        _build_rows(tmp_path, tok_bos, rows, family="prompt")


def test_unknown_split_and_format(tmp_path, tok_bos):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD])
    with pytest.raises(DataError, match=r"no split 'validation'; available: \['train'\]"):
        build("sft", path, tok_bos, tmp_path, eval_split="validation")
    with pytest.raises(DataError, match=r"data.format='hh' is not a sft format"):
        build("sft", path, tok_bos, tmp_path, format="hh")
    with pytest.raises(DataError, match=r"data.template='llama9' is not known"):
        build("sft", path, tok_bos, tmp_path, template="llama9")
