"""Bad data stops a run through the real entry point with exit 2, a message naming the file and line (or
row), and no traceback; and a PPO run reports its prompts as every run does."""

from __future__ import annotations

import json

import pytest

from tests.data.test_encodings_roles import ALTERNATING
from tests.engine.runs import run_cli
from tests.engine.test_reward_functions import ONE_ITERATION, rewards

CONVERSATION = [{"role": "user", "content": "Sort the letters: b a"}, {"role": "assistant", "content": "a b"}]


def _jsonl(path, rows, encoding="utf-8"):
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    return path


@pytest.mark.parametrize("rows, encoding, extra, message", [
    ([{"prompt": "Sort: b a", "completion": "a b"}, {"prompt": "Trié: b a", "completion": "a b"}], "cp1252", [],
     "rows.jsonl, line 2, column 16: byte(s) b'\\xe9' are not valid utf-8"),
    ([{"messages": CONVERSATION}, {"messages": [{"role": "narrator", "content": "x"}, *CONVERSATION]}], "utf-8", [],
     "rows.jsonl, line 2: message 0 has role 'narrator'"),
    ([{"messages": CONVERSATION}, {"messages": [CONVERSATION[0], *CONVERSATION]}], "utf-8",
     [f"data.template={json.dumps(ALTERNATING)}"],
     "rows.jsonl, line 2: the chat template refuses this conversation: TemplateError: Conversation roles must alternate"),
])
def test_bad_data_exits_2_naming_the_file_and_line(tmp_path, rows, encoding, extra, message):
    path = _jsonl(tmp_path / "rows.jsonl", rows, encoding)
    code, stderr = run_cli("sft.yaml", tmp_path / "run", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}",
                           *extra)
    assert code == 2 and "Traceback" not in stderr, stderr
    assert message in stderr


def test_a_ppo_run_writes_its_data_report(tmp_path):
    code, stderr = run_cli("ppo.yaml", tmp_path / "run", *ONE_ITERATION,
                           rewards("tests.rollout.rewards_fixture:length_reward"))
    assert code == 0, stderr
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["family"] == "prompt" and report["splits"]["train"]["rows_kept"] > 0
