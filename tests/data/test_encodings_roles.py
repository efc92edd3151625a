"""Text that is not UTF-8, a CSV saved by Excel, roles a template does not know and templates that refuse a
conversation: each is a DataError naming the file and the line (or the row), or is read right."""

import json

import pytest

from data import DataError
from tests.data.conftest import build, write_jsonl

GOOD = {"prompt": "Sort the letters: b a", "completion": "a b"}
# Mistral's check, as its chat template writes it
ALTERNATING = ("{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}assistant: {% endif %}")


def test_bytes_that_are_not_utf8_name_the_file_line_column_and_the_likely_encoding(tmp_path, tok_bos):
    path = tmp_path / "rows.jsonl"
    text = json.dumps(GOOD) + "\n" + json.dumps({"prompt": "Café crème, déjà vu, naïve à la carte", "completion": "é"},
                                                ensure_ascii=False) + "\n"
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(DataError, match=r"rows\.jsonl, line 2, column 16: byte\(s\) b'\\xe9' are not valid utf-8 .*"
                                        r"set data.encoding=cp125"):
        build("sft", path, tok_bos, tmp_path)
    rows = build("sft", path, tok_bos, tmp_path, encoding="cp1252").train
    assert len(rows) == 2


def test_a_csv_with_a_byte_order_mark_and_a_windows_encoding_reads_right(tmp_path, tok_bos):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,completion\r\nSort the letters: b a,a b\r\n")
    assert len(build("sft", path, tok_bos, tmp_path).train) == 1
    path.write_bytes("prompt,completion\r\nTrié: b a,a b\r\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"rows\.csv, line 2, column 4: .* not valid utf-8"):
        build("sft", path, tok_bos, tmp_path)
    assert len(build("sft", path, tok_bos, tmp_path, encoding="cp1252").train) == 1


def test_an_unknown_encoding_is_named(tmp_path, tok_bos):
    with pytest.raises(DataError, match="data.encoding='utf-9' is not a known text encoding"):
        build("sft", write_jsonl(tmp_path / "rows.jsonl", [GOOD]), tok_bos, tmp_path, encoding="utf-9")


@pytest.mark.parametrize("template", [None, "plain", "chatml"])
def test_a_role_outside_system_user_assistant_is_refused_naming_the_row(tmp_path, tok_bos, template):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(DataError, match=r"rows\.jsonl, line 2: message 0 has role 'narrator'.*expected roles "
                                        r"\['system', 'user', 'assistant'\]"):
        build("sft", write_jsonl(tmp_path / "rows.jsonl", rows), tok_bos, tmp_path, template=template)


def test_a_tool_role_is_accepted_by_a_template_that_has_tools(tmp_path, tok_bos):
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4"},
                          {"role": "assistant", "content": "4"}]}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match="message 1 has role 'tool'"):
        build("sft", path, tok_bos, tmp_path, template="chatml")
    tools = "{%- for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}{# tool #}"
    assert len(build("sft", path, tok_bos, tmp_path, template=tools).train) == 1


@pytest.mark.parametrize("family, row", [
    ("sft", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}),
    ("preference", {"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                    "chosen": "x", "rejected": "y"}),
])
def test_a_template_that_raises_names_the_row_and_the_templates_message(tmp_path, tok_bos, family, row):
    good = ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]} if family == "sft"
            else {"prompt": "a", "chosen": "x", "rejected": "y"})
    with pytest.raises(DataError, match=r"rows\.jsonl, line 2: the chat template refuses this conversation: "
                                        r"TemplateError: Conversation roles must alternate user/assistant"):
        build(family, write_jsonl(tmp_path / "rows.jsonl", [good, row]), tok_bos, tmp_path, template=ALTERNATING)
