"""Row formats, detected from the keys or named in the config, normalised to one record per family.

Canonical records (keys compared case-insensitively in the input; messages are role/content dicts):

    sft         {"messages": [...]}  loss on assistant turns     or  {"text": str} (pretraining-style)
                [, "weight": float]  the row's weight, for objectives that read one (reward_weighted_sft)
    preference  {"prompt_messages": [...], "chosen": str, "rejected": str[, "margin": float][, "soft_label": float]}
    prompt      {"prompt_messages": [...], "prompt": str, **every other field of the row, untouched}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from data.errors import DataError, row_error

FAMILIES = ("sft", "preference", "prompt")

# format -> (required keys, optional keys), per family; keys are lower case
FORMATS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "sft": {
        "messages": (("messages",), ("weight",)),
        "conversations": (("conversations",), ("weight",)),
        "prompt_completion": (("prompt", "completion"), ("weight",)),
        "prompt_response": (("prompt", "response"), ("weight",)),
        "qa": (("question", "answer"), ("weight",)),
        "alpaca": (("instruction", "output"), ("input", "system", "weight")),
        "text": (("text",), ("weight",)),
    },
    "preference": {
        "preference": (("prompt", "chosen", "rejected"), ("margin", "soft_label")),
        "binarized": (("chosen", "rejected"), ("prompt", "margin", "soft_label")),
        "hh": (("chosen", "rejected"), ("margin", "soft_label")),
    },
    "prompt": {
        "prompt": (("prompt",), ()),
        "messages": (("messages",), ()),
        "qa": (("question",), ()),
        "alpaca": (("instruction",), ("input", "system")),
    },
}

PAIR_NUMBERS = ("margin", "soft_label")
"""Optional per-pair numbers of a preference row, carried to the collator and the objective."""
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ASSISTANT = "\n\nAssistant:"


class Drop(Exception):
    """A row that is skipped and counted, with the reason as its message."""


def detect_format(family: str, named: str, first_row: Mapping[str, Any], source: str) -> str:
    if family not in FAMILIES:
        raise DataError(f"unknown data family {family!r}; expected one of {FAMILIES}.")
    formats = FORMATS[family]
    if named != "auto":
        if named not in formats:
            raise DataError(f"data.format={named!r} is not a {family} format; expected 'auto' or one of {sorted(formats)}.")
        return named
    keys = {str(k).lower() for k, v in first_row.items() if v is not None}
    if family == "preference" and {"chosen", "rejected"} <= keys:
        if "prompt" in keys:
            return "preference"
        return "binarized" if isinstance(_get(first_row, "chosen"), list) else "hh"
    for name, (required, _) in formats.items():
        if set(required) <= keys:
            return name
    expected = " or ".join("/".join(req) for req, _ in formats.values())
    raise DataError(
        f"{source}, row 1: cannot tell the {family} format from the keys {sorted(keys)}; expected keys {expected} "
        f"(key case is ignored). Rename the columns, or set data.format to one of {sorted(formats)}."
    )


def canonical(family: str, fmt: str, row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The canonical record of one row; raises DataError (bad row) or Drop (row skipped, counted)."""
    required, _ = FORMATS[family][fmt]
    lower = {str(k).lower(): k for k in row}
    missing = [k for k in required if row.get(lower.get(k)) is None]
    if missing:
        raise row_error(where, row, f"missing key(s) {missing} for format {fmt!r}", f"keys {list(required)}")
    r = _Row(row, lower, where, fmt)
    record = _CANONICAL[(family, fmt)](r)
    return _with_weight(r, record) if family == "sft" else record


class _Row:
    """A row with case-insensitive, type-checked access and errors that name the row."""

    def __init__(self, row: Mapping[str, Any], lower: dict[str, Any], where: str, fmt: str):
        self.row, self.lower, self.where, self.fmt = row, lower, where, fmt

    def raw(self, key: str) -> Any:
        return self.row.get(self.lower.get(key))

    def error(self, problem: str, expected: str, fix: str = "") -> DataError:
        return row_error(self.where, self.row, problem, expected, fix)

    def text(self, key: str, *, allow_empty: bool = False) -> str:
        value = self.raw(key)
        if value is None and allow_empty:
            return ""
        if not isinstance(value, str):
            raise self.error(f"field {key!r} is {type(value).__name__}", f"{key!r} to be a string (format {self.fmt!r})")
        if not allow_empty and not value.strip():
            raise self.error(f"field {key!r} is empty", f"a non-empty {key!r}", "Remove the row or fill the field.")
        return value

    def messages(self, key: str) -> list[dict[str, str]]:
        value = self.raw(key)
        if not isinstance(value, list) or not value:
            raise self.error(
                f"field {key!r} is {type(value).__name__ if value is not None else 'missing'}",
                f"{key!r} to be a non-empty list of {{'role': ..., 'content': ...}} messages",
            )
        out = []
        for i, m in enumerate(value):
            if not isinstance(m, Mapping):
                raise self.error(f"{key}[{i}] is {type(m).__name__}", "each message to be an object with role and content")
            ml = {str(k).lower(): v for k, v in m.items()}
            role, content = ml.get("role", ml.get("from")), ml.get("content", ml.get("value"))
            if not isinstance(role, str) or not isinstance(content, str):
                raise self.error(
                    f"{key}[{i}] has keys {sorted(ml)} with role {type(role).__name__} and content "
                    f"{type(content).__name__}",
                    "string 'role' and 'content' in every message (or ShareGPT 'from' and 'value')",
                )
            role = ROLE_ALIASES.get(role.lower(), role.lower())
            if role != "system" and not content.strip():
                raise self.error(f"{key}[{i}] ({role}) has empty content", "non-empty content in every turn")
            out.append({"role": role, "content": content})
        return out


def _sft_messages(r: _Row, key: str = "messages") -> dict:
    messages = r.messages(key)
    if not any(m["role"] == "assistant" for m in messages):
        roles = [m["role"] for m in messages]
        raise r.error(f"{key!r} has no assistant turn (roles {roles})", "at least one assistant turn to train on")
    if messages[0]["role"] == "assistant":
        raise r.error(f"{key!r} opens with an assistant turn", "a user or system turn before the first assistant turn",
                      "Add the prompt turn the answer responds to, or remove the row.")
    return {"messages": messages}


def _pair(prompt: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def _alpaca_prompt(r: _Row) -> list[dict[str, str]]:
    instruction, extra = r.text("instruction"), r.text("input", allow_empty=True)
    system = r.text("system", allow_empty=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    head = [{"role": "system", "content": system}] if system.strip() else []
    return head + [{"role": "user", "content": prompt}]


def _preference(r: _Row) -> dict:
    prompt = _prompt_messages(r, "prompt") if r.raw("prompt") is not None else []
    chosen_value, rejected_value = r.raw("chosen"), r.raw("rejected")
    if isinstance(chosen_value, list) or isinstance(rejected_value, list):
        chosen_turns, rejected_turns = r.messages("chosen"), r.messages("rejected")
        for name, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
            if turns[-1]["role"] != "assistant":
                raise r.error(f"the last turn of {name!r} is {turns[-1]['role']!r}", f"{name!r} to end with an assistant turn")
        if chosen_turns[:-1] != rejected_turns[:-1]:
            raise r.error(
                "'chosen' and 'rejected' differ before their last turn",
                "message lists that share every turn but the last (the prompt)",
            )
        if chosen_turns[:-1]:
            prompt = chosen_turns[:-1]
        chosen, rejected = chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    else:
        chosen, rejected = r.text("chosen"), r.text("rejected")
    if not prompt:
        raise r.error("no prompt", "a 'prompt' field, or 'chosen'/'rejected' message lists that include the prompt turns")
    return _with_pair_fields(r, {"prompt_messages": prompt, "chosen": chosen, "rejected": rejected})


def _hh(r: _Row) -> dict:
    chosen, rejected = r.text("chosen"), r.text("rejected")
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0 or cut + len(HH_ASSISTANT) > n:
        raise r.error(
            "'chosen' and 'rejected' share no '\\n\\nAssistant:' turn",
            "HH-RLHF transcripts ('\\n\\nHuman: ... \\n\\nAssistant: ...') that share the prompt",
            "Use prompt/chosen/rejected fields if your data is not in this form.",
        )
    cut += len(HH_ASSISTANT)
    prompt = _hh_messages(r, chosen[:cut])
    chosen_response, rejected_response = chosen[cut:].removeprefix(" "), rejected[cut:].removeprefix(" ")
    if not chosen_response.strip() or not rejected_response.strip():
        raise Drop("empty_response")
    return _with_pair_fields(r, {"prompt_messages": prompt, "chosen": chosen_response, "rejected": rejected_response})


def _hh_messages(r: _Row, transcript: str) -> list[dict[str, str]]:
    parts = HH_TURN.split(transcript)
    messages = [{"role": "system", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"]:
        raise r.error("the shared prompt does not end with a non-empty Human turn", "'...\\n\\nHuman: <text>\\n\\nAssistant:'")
    return messages


def _with_pair_fields(r: _Row, record: dict) -> dict:
    """The optional per-pair numbers: `margin` (a preference strength) and `soft_label` (the probability, in
    [0, 1], that chosen is preferred, as engine.label writes it)."""
    if record["chosen"] == record["rejected"]:
        raise Drop("chosen_equals_rejected")
    for key in PAIR_NUMBERS:
        if r.lower.get(key) is None:
            continue
        value = r.raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise r.error(f"field {key!r} is {type(value).__name__ if value == value else 'NaN'}",
                          f"{key!r} to be a number in every row that has one")
        if key == "soft_label" and not 0.0 <= value <= 1.0:
            raise r.error(f"field 'soft_label' is {value}", "'soft_label' to be a probability in [0, 1]",
                          "It is the probability that 'chosen' is preferred to 'rejected'.")
        record[key] = float(value)
    return record


def _with_weight(r: _Row, record: dict) -> dict:
    """An SFT row's optional `weight` (a finite number), read by objectives that weight rows."""
    if r.lower.get("weight") is not None:
        weight = r.raw("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise r.error(f"field 'weight' is {weight!r}", "'weight' to be a finite number in every row that has one")
        record["weight"] = float(weight)
    return record


def _prompt_messages(r: _Row, key: str) -> list[dict[str, str]]:
    if isinstance(r.raw(key), list):
        messages = r.messages(key)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            raise r.error(f"{key!r} has only assistant turns", f"{key!r} to contain a user turn")
        return messages
    return [{"role": "user", "content": r.text(key)}]


def _rl_prompt(r: _Row, messages: list[dict[str, str]], consumed: tuple[str, ...]) -> dict:
    users = [m["content"] for m in messages if m["role"] == "user"]
    passthrough = {k: v for k, v in r.row.items() if str(k).lower() not in consumed}
    return {**passthrough, "prompt_messages": messages, "prompt": users[-1] if users else messages[-1]["content"]}


_CANONICAL: dict[tuple[str, str], Callable[[_Row], dict]] = {
    ("sft", "messages"): _sft_messages,
    ("sft", "conversations"): lambda r: _sft_messages(r, "conversations"),
    ("sft", "prompt_completion"): lambda r: _pair(r.text("prompt"), r.text("completion")),
    ("sft", "prompt_response"): lambda r: _pair(r.text("prompt"), r.text("response")),
    ("sft", "qa"): lambda r: _pair(r.text("question"), r.text("answer")),
    ("sft", "alpaca"): lambda r: {"messages": _alpaca_prompt(r) + [{"role": "assistant", "content": r.text("output")}]},
    ("sft", "text"): lambda r: {"text": r.text("text")},
    ("preference", "preference"): _preference,
    ("preference", "binarized"): _preference,
    ("preference", "hh"): _hh,
    ("prompt", "prompt"): lambda r: _rl_prompt(r, _prompt_messages(r, "prompt"), ("prompt",)),
    ("prompt", "messages"): lambda r: _rl_prompt(r, _prompt_messages(r, "messages"), ("messages",)),
    ("prompt", "qa"): lambda r: _rl_prompt(r, [{"role": "user", "content": r.text("question")}], ("question",)),
    ("prompt", "alpaca"): lambda r: _rl_prompt(r, _alpaca_prompt(r), ("instruction", "input", "system")),
}


def _get(row: Mapping[str, Any], key: str) -> Any:
    for k, v in row.items():
        if str(k).lower() == key:
            return v
    return None
