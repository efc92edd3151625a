"""Every row format, detected from its keys, gives the canonical record and the right trained tokens."""

import pytest
import torch

from data import DataError, make_collator
from data.formats import canonical, detect_format
from tests.data.conftest import build, write_jsonl


def _trained_text(tok, ids, labels):
    return tok.decode([t for t, lab in zip(ids, labels) if lab != -100])


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "Sort the letters: b a", "completion": "a b"}, "prompt_completion"),
        ({"prompt": "Sort the letters: b a", "response": "a b"}, "prompt_response"),
        ({"Question": "Sort the letters: b a", "Answer": "a b"}, "qa"),
        ({"instruction": "Sort the letters: b a", "input": "", "output": "a b"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "Sort the letters: b a"},
                       {"role": "assistant", "content": "a b"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "Sort the letters: b a"},
                            {"from": "gpt", "value": "a b"}]}, "conversations"),
    ],
)
def test_sft_formats_detected_and_trained_on_the_answer(tmp_path, tok_bos, row, fmt):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    bundle = build("sft", path, tok_bos, tmp_path)
    assert bundle.report.row_format == fmt
    r = bundle.train[0]
    assert _trained_text(tok_bos, r["input_ids"], r["labels"]) == "a b</s>"
    assert tok_bos.decode(r["input_ids"]) == "<s><|user|>\nSort the letters: b a</s>\n<|assistant|>\na b</s>"


def test_alpaca_input_joins_the_instruction():
    record = canonical("sft", "alpaca", {"instruction": "Sort.", "input": "b a", "output": "a b"}, "f, line 1")
    assert record["messages"][0] == {"role": "user", "content": "Sort.\n\nb a"}


def test_multi_turn_messages_train_on_every_assistant_turn(tmp_path, tok_bos):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort the letters: b a"},
        {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "Now: d c"},
        {"role": "assistant", "content": "c d"},
    ]
    bundle = build("sft", write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]), tok_bos, tmp_path)
    r = bundle.train[0]
    assert tok_bos.decode(r["input_ids"]) == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nSort the letters: b a</s>\n<|assistant|>\na b</s>\n"
        "<|user|>\nNow: d c</s>\n<|assistant|>\nc d</s>"
    )
    assert _trained_text(tok_bos, r["input_ids"], r["labels"]) == "a b</s>c d</s>"


def test_text_rows_train_on_everything_or_after_the_response_template(tmp_path, tok_bos):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "### Q: sort b a\n### A: a b"}])
    whole = build("sft", path, tok_bos, tmp_path).train[0]
    assert whole["labels"][0] == -100 and whole["input_ids"][0] == tok_bos.bos_token_id
    assert _trained_text(tok_bos, whole["input_ids"], whole["labels"]) == "### Q: sort b a\n### A: a b</s>"
    cut = build("sft", path, tok_bos, tmp_path, response_template="### A:").train[0]
    assert _trained_text(tok_bos, cut["input_ids"], cut["labels"]) == " a b</s>"


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"prompt": "Sort the letters: b a", "chosen": "a b", "rejected": "b a"}, "preference"),
        ({"prompt": [{"role": "user", "content": "Sort the letters: b a"}],
          "chosen": [{"role": "assistant", "content": "a b"}],
          "rejected": [{"role": "assistant", "content": "b a"}]}, "preference"),
        ({"prompt": "Sort the letters: b a",
          "chosen": [{"role": "user", "content": "Sort the letters: b a"}, {"role": "assistant", "content": "a b"}],
          "rejected": [{"role": "user", "content": "Sort the letters: b a"}, {"role": "assistant", "content": "b a"}]},
         "preference"),
        ({"chosen": [{"role": "user", "content": "Sort the letters: b a"}, {"role": "assistant", "content": "a b"}],
          "rejected": [{"role": "user", "content": "Sort the letters: b a"}, {"role": "assistant", "content": "b a"}]},
         "binarized"),
        ({"chosen": "\n\nHuman: Sort the letters: b a\n\nAssistant: a b",
          "rejected": "\n\nHuman: Sort the letters: b a\n\nAssistant: b a"}, "hh"),
    ],
)
def test_preference_formats(tmp_path, tok_bos, row, fmt):
    bundle = build("preference", write_jsonl(tmp_path / "p.jsonl", [row]), tok_bos, tmp_path)
    assert bundle.report.row_format == fmt
    r = bundle.train[0]
    prompt = "<s><|user|>\nSort the letters: b a</s>\n<|assistant|>\n"
    assert tok_bos.decode(r["chosen_input_ids"]) == prompt + "a b</s>"
    assert tok_bos.decode(r["rejected_input_ids"]) == prompt + "b a</s>"
    assert _trained_text(tok_bos, r["rejected_input_ids"], r["rejected_labels"]) == "b a</s>"
    assert "margin" not in r


def test_hh_splits_at_the_last_shared_turn():
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Sort b a\n\nAssistant: a b",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Sort b a\n\nAssistant: b a, I think",
    }
    record = canonical("preference", "hh", row, "hh.jsonl, line 1")
    assert record["prompt_messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Sort b a"},
    ]
    assert (record["chosen"], record["rejected"]) == ("a b", "b a, I think")


def test_hh_responses_that_differ_from_an_earlier_turn_keep_the_rest_of_the_dialogue():
    row = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye!",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.",
    }
    record = canonical("preference", "hh", row, "hh.jsonl, line 1")
    assert record["prompt_messages"] == [{"role": "user", "content": "Hi"}]
    assert record["chosen"] == "Hello!\n\nHuman: Bye\n\nAssistant: Bye!"


def test_margin_is_kept_and_collated(tmp_path, tok_bos):
    rows = [{"prompt": "Sort the letters: b a", "chosen": "a b", "rejected": "b a", "margin": 0.5},
            {"prompt": "Sort the letters: d c", "chosen": "c d", "rejected": "d", "margin": 2}]
    bundle = build("preference", write_jsonl(tmp_path / "m.jsonl", rows), tok_bos, tmp_path)
    assert bundle.train["margin"] == [0.5, 2.0]


def test_sft_weight_is_kept_and_collated(tmp_path, tok_bos):
    """A `weight` beside any SFT format's keys becomes a float column, and each batch's (B,) weight."""
    rows = [{"prompt": "Sort the letters: b a", "completion": "a b", "weight": 0.5},
            {"prompt": "Sort the letters: d c", "completion": "c d", "weight": 2}]
    bundle = build("sft", write_jsonl(tmp_path / "w.jsonl", rows), tok_bos, tmp_path)
    assert bundle.train["weight"] == [0.5, 2.0]
    batch = make_collator("sft", tok_bos)([bundle.train[0], bundle.train[1]])
    assert batch["weight"].tolist() == [0.5, 2.0] and batch["weight"].dtype == torch.float32
    assert "weight" not in make_collator("sft", tok_bos, packing=True)([bundle.train[0], bundle.train[1]])
    record = canonical("sft", "messages", {"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}], "weight": 3}, "m")
    assert record["weight"] == 3.0
    unweighted = build("sft", write_jsonl(tmp_path / "u.jsonl", [{k: r[k] for k in ("prompt", "completion")}
                                                                for r in rows]), tok_bos, tmp_path)
    assert "weight" not in unweighted.train.column_names


@pytest.mark.parametrize("weight", ["high", True, float("nan"), float("inf")])
def test_sft_weight_must_be_a_finite_number(weight):
    with pytest.raises(DataError, match="'weight' to be a finite number"):
        canonical("sft", "prompt_completion", {"prompt": "p", "completion": "c", "weight": weight}, "w.jsonl, line 1")


def test_sft_weight_on_some_rows_only_is_refused(tmp_path, tok_bos):
    rows = [{"prompt": "Sort the letters: b a", "completion": "a b", "weight": 0.5},
            {"prompt": "Sort the letters: d c", "completion": "c d"}]
    with pytest.raises(DataError, match="'weight' is set on some rows and not on others"):
        build("sft", write_jsonl(tmp_path / "w.jsonl", rows), tok_bos, tmp_path)


@pytest.mark.parametrize(
    "row, fmt, prompt",
    [
        ({"prompt": "Sort the letters: b a", "answer": "a b", "meta": {"id": 7}}, "prompt", "Sort the letters: b a"),
        ({"messages": [{"role": "user", "content": "Sort the letters: b a"}], "answer": "a b", "meta": {"id": 7}},
         "messages", "Sort the letters: b a"),
        ({"question": "Sort the letters: b a", "answer": "a b", "meta": {"id": 7}}, "qa", "Sort the letters: b a"),
    ],
)
def test_prompt_formats_pass_other_fields_through(tmp_path, tok_bos, row, fmt, prompt):
    bundle = build("prompt", write_jsonl(tmp_path / "r.jsonl", [row]), tok_bos, tmp_path)
    assert bundle.report.row_format == fmt
    r = bundle.train[0]
    assert r["prompt"] == prompt and r["answer"] == "a b" and r["meta"] == {"id": 7}
    assert tok_bos.decode(r["prompt_input_ids"]) == "<s><|user|>\nSort the letters: b a</s>\n<|assistant|>\n"


def test_named_format_overrides_detection():
    assert detect_format("sft", "text", {"text": "x", "prompt": "p", "completion": "c"}, "f") == "text"
    assert detect_format("sft", "auto", {"text": "x", "prompt": "p", "completion": "c"}, "f") == "prompt_completion"
