"""A seeded toy task with a programmatic judge: sort 3 to 6 distinct lowercase letters.

    prompt:   "Sort the letters: q e b m"
    response: "b e m q"

A model of a few million parameters learns the answer's format (space-separated single letters,
as many as the prompt has) within a minute of SFT on CPU; putting every letter in the right place
takes longer, so the judge has room to go up under DPO, ORPO or PPO.

The judge gives partial credit: 0.2 for the format, plus 0.8 times the fraction of positions that
hold the right letter (divided by the longer of the answer and the response, so padding a response
with extra letters does not pay). The rejected response of a preference pair is the correct answer
with one corruption (two letters swapped, one letter replaced, one dropped, or one duplicated), each
of which scores strictly lower than the correct answer.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from pathlib import Path

PROMPT_TEMPLATE = "Sort the letters: {letters}"
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


def judge(prompt: str, response: str) -> float:
    """Score a response to a sorting prompt in [0, 1]: 1 for the sorted letters, partial credit otherwise."""
    target = sorted(parse_prompt(prompt))
    text = response.strip()
    for eos in _EOS_STRINGS:
        text = text.removesuffix(eos).strip()
    tokens = text.split()
    well_formed = len(tokens) == len(target) and all(len(t) == 1 and t in string.ascii_lowercase for t in tokens)
    correct = sum(t == g for t, g in zip(tokens, target))
    score = FORMAT_CREDIT * well_formed + (1.0 - FORMAT_CREDIT) * correct / max(len(tokens), len(target))
    return min(1.0, score)


def judge_reward(prompts: list[str], responses: list[str], **fields) -> list[float]:
    """`judge` over a batch, in the reward-function signature (extra per-row fields are ignored)."""
    return [judge(p, r) for p, r in zip(prompts, responses, strict=True)]


def sample_letters(rng: random.Random, min_letters: int = 3, max_letters: int = 6) -> list[str]:
    """Distinct letters, never already sorted (so echoing the prompt is not the answer)."""
    n = rng.randint(min_letters, max_letters)
    while True:
        letters = rng.sample(string.ascii_lowercase, n)
        if letters != sorted(letters):
            return letters


def corrupt(rng: random.Random, target: list[str]) -> list[str]:
    """One corruption of the sorted letters; every kind strictly lowers the judge's score."""
    out = list(target)
    kind = rng.choice(_CORRUPTIONS)
    i = rng.randrange(len(out))
    if kind == "swap":
        j = rng.choice([k for k in range(len(out)) if k != i])
        out[i], out[j] = out[j], out[i]
    elif kind == "replace":
        out[i] = rng.choice([c for c in string.ascii_lowercase if c not in target])
    elif kind == "drop":
        del out[i]
    else:
        out.insert(i, out[i])
    return out


def generate(split: str, n: int, *, seed: int = 0, min_letters: int = 3, max_letters: int = 6) -> list[dict]:
    """`n` rows of one split ("sft", "preference" or "prompt"); rows depend only on (split, n, seed, sizes)."""
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for _ in range(n):
        letters = sample_letters(rng, min_letters, max_letters)
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
    min_letters: int = 3,
    max_letters: int = 6,
) -> dict[str, Path]:
    """Write sft / preference / prompt train+test JSONL files; returns {"sft_train": path, ...}.

    Train and test draw from different seeds, so the test prompts are (almost all) unseen.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for family in ("sft", "preference", "prompt"):
        for part, n, part_seed in (("train", n_train, seed), ("test", n_test, seed + 1_000_003)):
            rows = generate(family, n, seed=part_seed, min_letters=min_letters, max_letters=max_letters)
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
