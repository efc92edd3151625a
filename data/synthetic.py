"""A seeded toy task with a programmatic judge: sort 4 to 10 lowercase letters (repeats allowed).

    prompt:   "Sort the letters: q e b m e"
    response: "b e e m q"

Why this task: the 3M-parameter tiny Llama (configs/tiny/model.json) learns the answer's form
(space-separated single letters, smallest first) in 100 SFT steps of 32 rows (half a minute on two
CPU cores), where its greedy answers score about 0.77 and 40% are exact; after 400 steps (under two
minutes) they score about 0.96 and one in eight still drops or repeats a letter, mostly in long
prompts with repeated letters. So the judge has room to go up under DPO, ORPO or PPO. Prompt and
response stay under 40 tokens.

The judge gives partial credit: 0.2 for the form (single letters, as many as the prompt has) plus
0.8 * (1 - d / max(len(response), len(answer))), with d the edit distance (Levenshtein, over letters)
from the sorted answer. The rejected response of a preference pair is the answer with one corruption
(two different letters swapped, a letter replaced, dropped or duplicated): d >= 1, so it scores
strictly below the answer.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from pathlib import Path

PROMPT_TEMPLATE = "Sort the letters: {letters}"
MIN_LETTERS, MAX_LETTERS, REPEATS = 4, 10, True
TASK_VERSION = 2
"""Bumped whenever generated rows change, so cached files and tokenised datasets are rebuilt."""
FORMAT_CREDIT = 0.2
_PROMPT_RE = re.compile(r"Sort the letters:((?:[ \t]+[a-z]\b)+)")
_EOS_STRINGS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")
_CORRUPTIONS = ("swap", "replace", "drop", "duplicate")


def make_prompt(letters: list[str]) -> str:
    return PROMPT_TEMPLATE.format(letters=" ".join(letters))


def parse_prompt(prompt: str) -> list[str]:
    """The letters of the last task statement in `prompt` (which may be wrapped in a chat template)."""
    matches = _PROMPT_RE.findall(prompt)
    if not matches:
        raise ValueError(f"not a sorting prompt (expected {PROMPT_TEMPLATE!r}): {prompt!r}")
    return matches[-1].split()


def answer(prompt: str) -> str:
    return " ".join(sorted(parse_prompt(prompt)))


def edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance: insertions, deletions and substitutions, each costing 1."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def judge(prompt: str, response: str) -> float:
    """Score a response to a sorting prompt in [0, 1]: 1 for the sorted letters, partial credit otherwise."""
    target = sorted(parse_prompt(prompt))
    text = response.strip()
    for eos in _EOS_STRINGS:
        text = text.removesuffix(eos).strip()
    tokens = text.split()
    well_formed = len(tokens) == len(target) and all(len(t) == 1 and t in string.ascii_lowercase for t in tokens)
    closeness = 1.0 - edit_distance(tokens, target) / max(len(tokens), len(target))
    return min(1.0, FORMAT_CREDIT * well_formed + (1.0 - FORMAT_CREDIT) * closeness)


def judge_reward(prompts: list[str], responses: list[str], **fields) -> list[float]:
    """`judge` over a batch, in the reward-function signature (extra per-row fields are ignored)."""
    return [judge(p, r) for p, r in zip(prompts, responses, strict=True)]


def sample_letters(rng: random.Random, min_letters: int, max_letters: int, repeats: bool) -> list[str]:
    """Letters (distinct unless `repeats`), at least two different, never already sorted."""
    n = rng.randint(min_letters, max_letters)
    while True:
        letters = rng.choices(string.ascii_lowercase, k=n) if repeats else rng.sample(string.ascii_lowercase, n)
        if letters != sorted(letters):
            return letters


def corrupt(rng: random.Random, target: list[str]) -> list[str]:
    """One corruption of the sorted letters; every kind strictly lowers the judge's score."""
    out = list(target)
    kind = rng.choice(_CORRUPTIONS)
    i = rng.randrange(len(out))
    if kind == "swap":
        j = rng.choice([k for k in range(len(out)) if out[k] != out[i]])
        out[i], out[j] = out[j], out[i]
    elif kind == "replace":
        out[i] = rng.choice([c for c in string.ascii_lowercase if c != out[i]])
    elif kind == "drop":
        del out[i]
    else:
        out.insert(i, out[i])
    return out


def comparisons(n: int, *, seed: int = 0, max_corruptions: int = 3) -> list[dict]:
    """`n` comparisons of two answers to one prompt, each labelled by `judge`: {"prompt", "response_1",
    "response_2", "better": 1 or 2}, for training a judge model (the RLAIF demo, configs/rlaif/).

    Each answer is the sorted letters with 0 to `max_corruptions` corruptions (`corrupt`, applied in turn),
    so the rows hold the task's preference pairs (the answer against one corruption) and comparisons of
    two wrong answers, as a policy's samples are; a draw whose two answers score the same is drawn again.
    Rows depend only on the arguments."""
    rng = random.Random(f"{seed}:comparisons")
    rows = []
    while len(rows) < n:
        letters = sample_letters(rng, MIN_LETTERS, MAX_LETTERS, REPEATS)
        prompt, target = make_prompt(letters), sorted(letters)
        answers = []
        for _ in range(2):
            out = list(target)
            for _ in range(rng.randint(0, max_corruptions)):
                if len(set(out)) > 1:  # a swap needs two different letters; a shorter answer may have none
                    out = corrupt(rng, out)
            answers.append(" ".join(out))
        scores = [judge(prompt, answer) for answer in answers]
        if scores[0] != scores[1]:
            rows.append({"prompt": prompt, "response_1": answers[0], "response_2": answers[1],
                         "better": 1 if scores[0] > scores[1] else 2})
    return rows


def generate(
    split: str,
    n: int,
    *,
    seed: int = 0,
    min_letters: int = MIN_LETTERS,
    max_letters: int = MAX_LETTERS,
    repeats: bool = REPEATS,
) -> list[dict]:
    """`n` rows of one split ("sft", "preference" or "prompt"); rows depend only on the arguments."""
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for _ in range(n):
        letters = sample_letters(rng, min_letters, max_letters, repeats)
        prompt, target = make_prompt(letters), sorted(letters)
        if split == "sft":
            rows.append({"prompt": prompt, "completion": " ".join(target)})
        elif split == "preference":
            rows.append({"prompt": prompt, "chosen": " ".join(target), "rejected": " ".join(corrupt(rng, target))})
        elif split == "prompt":
            rows.append({"prompt": prompt, "answer": " ".join(target), "num_letters": len(letters)})
        else:
            raise ValueError(f"unknown split {split!r}; expected 'sft', 'preference' or 'prompt'")
    return rows


def write_synthetic(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_test: int = 200,
    min_letters: int = MIN_LETTERS,
    max_letters: int = MAX_LETTERS,
    repeats: bool = REPEATS,
) -> dict[str, Path]:
    """Write sft / preference / prompt train+test JSONL files; returns {"sft_train": path, ...}.

    Train and test draw from different seeds, so the test prompts are (almost all) unseen.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for family in ("sft", "preference", "prompt"):
        for part, n, part_seed in (("train", n_train, seed), ("test", n_test, seed + 1_000_003)):
            rows = generate(family, n, seed=part_seed, min_letters=min_letters, max_letters=max_letters, repeats=repeats)
            path = out / f"{family}_{part}.jsonl"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(path)
            paths[f"{family}_{part}"] = path
    return paths


def corpus(n: int = 2000, *, seed: int = 0) -> list[str]:
    """Text of the task (prompts and answers) for training a tokenizer."""
    rows = generate("sft", n, seed=seed)
    return [f"{r['prompt']}\n{r['completion']}" for r in rows]
