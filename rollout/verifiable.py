"""Verifiable rewards: rule-based checks of a response, against a reference answer or a pattern.

Each is a reward function with the signature of every `ppo.rewards` function,
`fn(prompts, responses, **fields) -> list[float]`, named in a config by its path with its settings as
`kwargs`, and weighted, summed and logged (`objective/score/<name>`) like any other source:

    ppo:
      rewards:
        - {name: correct, function: "rollout.verifiable:exact_match", kwargs: {extract: boxed}}
        - {name: format, function: "rollout.verifiable:format_reward", weight: 0.1,
           kwargs: {pattern: '<think>.*</think>\\s*<answer>.*</answer>'}}
        - {name: length, function: "rollout.verifiable:length_penalty", kwargs: {target: 400, coef: 0.01}}

`fields` are the prompt row's other dataset columns, one list per column (the prompt collator's `extras`),
so a GSM8K row {"question": ..., "answer": "... #### 72"} read with `data.format: qa` gives exact_match
its reference as `fields["answer"]`.

Each function carries `check_kwargs(**kwargs)`, which `rollout.scoring.check_reward_kwargs` runs at
start-up on the config's kwargs: a misspelt or missing setting, an unknown rule, a regex that does not
compile or a tokenizer that does not load stops the run with exit 2 before any model loads. The same
checks run again on a call (as a `RewardError`, which stops the run at once) for a function used
without that start-up step.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable
from decimal import Decimal

from rollout.scoring import RewardError

EXTRACTORS: dict[str, Callable[[str], str | None]] = {}
"""Answer-extraction rules by name (exact_match's `extract`): text -> the answer, or None when there is none."""
FORMAT_MODES = ("fullmatch", "search")
LENGTH_UNITS = ("characters", "tokens")

# A number as written in an answer: sign (not after a letter or digit, so "5-3" is 5 then 3), optional "$",
# digits with optional thousands commas, optional decimals. "-3.50." reads as -3.50, "$1,234" as 1234.
_NUMBER = r"(?:(?<![\w.])[-+])?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_NUMBER_AT_START = re.compile(rf"({_NUMBER})\.?(?=\s|$)")
_BOXED = re.compile(r"\\boxed\s*\{")


def _extractor(name: str) -> Callable[[str], str | None]:
    def register(fn):
        EXTRACTORS[name] = fn
        return fn
    return register


@_extractor("hash")
def extract_hash(text: str) -> str | None:
    """GSM8K's final-answer line: what follows the last `####` on its line. When that starts with a number
    (followed by a space or the end) the number alone is the answer, as OpenAI's grade-school-math grader
    reads `#### (-?[0-9.,]+)`: `#### 1,234` -> "1,234", `#### 72 apples` -> "72"; otherwise the whole line:
    `#### b e m q` -> "b e m q"."""
    if "####" not in text:
        return None
    line = text.rsplit("####", 1)[1].split("\n", 1)[0].strip()
    number = _NUMBER_AT_START.match(line)
    return (number.group(1) if number else line) or None


@_extractor("boxed")
def extract_boxed(text: str) -> str | None:
    r"""The contents of the last `\boxed{...}`, braces matched so nested ones stay whole:
    `\boxed{\frac{1}{2}}` -> `\frac{1}{2}`. None when there is none, or its braces do not close."""
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth = 1
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip() or None
    return None


@_extractor("last_number")
def extract_last_number(text: str) -> str | None:
    """The last number in the text, as written: "so x = -3.50." -> "-3.50"; "$1,234 in total" -> "$1,234"."""
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def as_number(answer: str) -> Decimal | None:
    """The answer's value when it is a plain number once commas, `$` and a trailing "." are dropped, else None.
    Decimal, so "42.0" == "42" and "0.1" is exact."""
    match = _NUMBER_AT_START.fullmatch(answer.strip())
    return Decimal(match.group(1).replace(",", "").replace("$", "")) if match else None


def answers_equal(answer: str, reference: str) -> bool:
    """Numeric equality when both are numbers, else string equality with runs of whitespace made one space
    and a trailing "." dropped."""
    a, b = as_number(answer), as_number(reference)
    if a is not None and b is not None:
        return a == b
    return _plain(answer) == _plain(reference)


def _plain(text: str) -> str:
    return " ".join(text.split()).rstrip(".").strip()


def reference_answer(reference) -> str | None:
    r"""The answer of a dataset's reference: a `####` line (GSM8K's answer column holds the whole solution)
    cut by the hash rule, a `\boxed{}` (MATH's solution column) by the boxed rule, anything else as written;
    numbers (a JSON column of ints) as their text. None for a missing or empty reference."""
    if reference is None or isinstance(reference, bool):
        return None
    text = str(reference)
    if "####" in text:
        return extract_hash(text)
    if _BOXED.search(text):
        return extract_boxed(text)
    return text.strip() or None


def checks_kwargs(validate: Callable[..., object]):
    """Give a reward function `check_kwargs(**kwargs)`: every key must be one of its keyword-only parameters
    (the dataset's columns reach it as `**fields` too, so a misspelt setting would otherwise be taken for a
    column and ignored), every one without a default given, and then `validate(**settings)`, the same
    checks its body makes, runs on the settings with their defaults filled in."""
    def attach(fn):
        params = {p.name: p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}

        def check_kwargs(**kwargs) -> None:
            for key in kwargs:
                if key not in params:
                    near = difflib.get_close_matches(key, params, n=1)
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    raise ValueError(f"{fn.__name__} has no keyword argument {key!r}{hint}; it takes "
                                     f"{', '.join(params)}")
            missing = [name for name, p in params.items() if p.default is p.empty and name not in kwargs]
            if missing:
                raise ValueError(f"{fn.__name__} needs kwargs {', '.join(missing)}")
            validate(**{name: kwargs.get(name, p.default) for name, p in params.items()})

        fn.check_kwargs = check_kwargs
        return fn
    return attach


def _rule(extract: str) -> Callable[[str], str | None]:
    if extract not in EXTRACTORS:
        raise RewardError(f"exact_match: extract={extract!r} is not one of {list(EXTRACTORS)}")
    return EXTRACTORS[extract]


def _match_settings(extract: str, answer_key: str) -> Callable[[str], str | None]:
    if not isinstance(answer_key, str):
        raise RewardError(f"exact_match: answer_key must be a column name, got {answer_key!r}")
    return _rule(extract)


@checks_kwargs(_match_settings)
def exact_match(prompts: list[str], responses: list[str], *, extract: str = "hash", answer_key: str = "answer",
                **fields) -> list[float]:
    r"""1.0 where the final answer of the response equals the row's reference answer, else 0.0.

    Args:
        extract: how the answer is read from the response (`EXTRACTORS`): "hash", GSM8K's `#### 42`;
            "boxed", the last `\boxed{...}`; "last_number", the last number in the text.
        answer_key: the dataset column holding the reference (`reference_answer` reads a `####` or
            `\boxed{}` form). Answers compare by value when both are numbers ("42.0" == "$42"), else as
            text (`answers_equal`).

    A response with no answer the rule can read scores 0.0. A row whose reference is missing or empty
    raises, so that row alone is skipped (`rollout/skipped`); no column `answer_key` at all is a RewardError.
    """
    read = _match_settings(extract, answer_key)
    if answer_key not in fields:
        raise RewardError(f"exact_match: no column {answer_key!r} among the prompt rows' fields "
                          f"{sorted(fields)}; set kwargs.answer_key to the column holding the reference answer")
    scores = []
    for response, reference in zip(responses, fields[answer_key], strict=True):
        target = reference_answer(reference)
        if target is None:
            raise ValueError(f"exact_match: no reference answer in column {answer_key!r}: {reference!r}")
        answer = read(response)
        scores.append(float(answer is not None and answers_equal(answer, target)))
    return scores


def _matcher(pattern: str, mode: str) -> Callable[[str], re.Match | None]:
    """`pattern` compiled once per process (DOTALL: "." crosses lines), as the bound fullmatch or search."""
    if mode not in FORMAT_MODES:
        raise RewardError(f"format_reward: mode={mode!r} is not one of {list(FORMAT_MODES)}")
    if not isinstance(pattern, str):
        raise RewardError(f"format_reward: pattern must be a string, got {pattern!r}")
    return _compiled(pattern, mode)


@functools.cache
def _compiled(pattern: str, mode: str) -> Callable[[str], re.Match | None]:
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as error:
        raise RewardError(f"format_reward: pattern {pattern!r} is not a valid regular expression: {error}") from None
    return getattr(regex, mode)


@checks_kwargs(_matcher)
def format_reward(prompts: list[str], responses: list[str], *, pattern: str, mode: str = "fullmatch",
                  **fields) -> list[float]:
    """1.0 where the response matches the regular expression `pattern`, else 0.0.

    Args:
        pattern: a Python regular expression, compiled once with re.DOTALL (so ".*" spans lines).
        mode: "fullmatch", the whole response (as decoded, leading and trailing spaces included) must
            match; "search", a match anywhere is enough.
    """
    match = _matcher(pattern, mode)
    return [float(match(response) is not None) for response in responses]


@functools.cache
def _token_counter(tokenizer: str) -> Callable[[list[str]], list[int]]:
    """Tokens per text for the tokenizer at `tokenizer` (a path or hub id), loaded once per process."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as error:  # OSError for a missing path, ValueError for an unknown kind, ...
        raise RewardError(f"length_penalty: tokenizer {tokenizer!r} does not load ({type(error).__name__}: "
                          f"{error})") from None
    return lambda texts: [len(ids) for ids in tok(list(texts), add_special_tokens=False).input_ids] if texts else []


def _length_settings(target, coef, unit, tokenizer) -> Callable[[list[str]], list[int]]:
    for key, value in (("target", target), ("coef", coef)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise RewardError(f"length_penalty: {key} must be a number >= 0, got {value!r}")
    if unit not in LENGTH_UNITS:
        raise RewardError(f"length_penalty: unit={unit!r} is not one of {list(LENGTH_UNITS)}")
    if (unit == "tokens") != (tokenizer is not None):
        raise RewardError("length_penalty: unit=tokens needs kwargs.tokenizer (a path or hub id; the policy's), and "
                          f"unit=characters takes none; got unit={unit!r}, tokenizer={tokenizer!r}")
    return _token_counter(tokenizer) if unit == "tokens" else (lambda texts: [len(t) for t in texts])


@checks_kwargs(_length_settings)
def length_penalty(prompts: list[str], responses: list[str], *, target: int, coef: float = 1.0,
                   unit: str = "characters", tokenizer: str | None = None, **fields) -> list[float]:
    """-coef * max(0, length - target): 0 up to `target`, then linear in the excess.

    With target = L_max - L_cache and coef = 1 / L_cache in tokens, where L_max is `max_new_tokens`, this is
    DAPO's soft overlong punishment (Yu et al. 2025, Sec. 3.4): it reaches -1 at the longest response the
    rollout can sample, so its floor of -1 beyond L_max is never needed.

    Args:
        target: the length that costs nothing.
        coef: penalty per unit beyond it (the source's `weight` multiplies it as any score).
        unit: "characters" of the decoded response, or "tokens" of `tokenizer`.
        tokenizer: with unit "tokens", the path or hub id of the tokenizer to count with (loaded once). The
            response is re-tokenised from its decoded text, so the count leaves out the special tokens that
            decoding drops (the EOS) and can differ from the sampled ids where a tokenizer has two spellings
            of the same text; for the exact sampled count use the rollout's action mask.
    """
    lengths = _length_settings(target, coef, unit, tokenizer)(responses)
    return [0.0 if n <= target else -coef * (n - target) for n in lengths]
