"""The `data:` section of a run's config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    """Where the rows come from, how they are read, formatted, tokenised and batched."""

    path: str = "synthetic"
    """A file (.json .jsonl .csv .parquet), a directory (`save_to_disk` output, or data files), a
    Hugging Face dataset name, or "synthetic" (the sorting task of data/synthetic.py)."""
    subset: str | None = None
    """Hugging Face dataset configuration name."""
    split: str = "train"
    eval_split: str | None = None
    """Split to evaluate on; None takes "test" or "validation" when the source has one, otherwise
    holds out `eval_fraction` of `split` (seeded)."""
    eval_fraction: float = 0.05
    """Held-out fraction when there is no eval split; 0 disables evaluation."""
    encoding: str = "utf-8"
    """Text encoding of JSON, JSONL and CSV files (a Python codec name, e.g. "cp1252", "latin-1"); a UTF-8
    byte-order mark at the start of a file is dropped whatever the encoding."""
    format: str = "auto"
    """Row format: "auto" (detected from the keys), or one of data.formats.FORMATS, e.g.
    "prompt_completion", "messages", "alpaca", "text", "preference", "hh", "prompt"."""
    max_length: int = 512
    """Tokens per prompt+response; responses are cut from the right to fit."""
    max_prompt_length: int | None = 256
    """Tokens per prompt; prompts are cut from the left (their end, next to the response, is kept).
    None: prompts are not cut, and rows whose prompt leaves no room for a response token are dropped."""
    template: str | None = None
    """None: the tokenizer's chat template if it has one, else `prompt_format`. "plain": always
    `prompt_format`. "raw": the prompt text as is (already formatted data). "chatml" or "zephyr": a
    built-in chat template. Anything containing "{{" or "{%": a Jinja chat template."""
    prompt_format: str = "Question: {prompt}\n\nAnswer: "
    response_template: str | None = None
    """For `text` rows: the marker after which the response starts (loss only after it)."""
    train_on_prompt: bool = False
    """Also put the loss on prompt tokens (default: completion-only)."""
    num_proc: int = 1
    """Processes for tokenisation (datasets.map)."""
    sample_ratio: float = 1.0
    """Keep this fraction of training rows (seeded), for quick runs."""
    max_samples: int | None = None
    """Keep at most this many training rows, after `sample_ratio`."""
    seed: int = 0
    packing: bool = False
    """Padding-free batches: sequences concatenated into one row, position ids restarting per sequence."""
    share_prompt: bool = True
    """Preference batches hold each prompt once: each pair as prompt + chosen + rejected response, with an
    attention mask that hides chosen from rejected and rejected position ids restarting after the prompt.
    Exact (the same log-probs and rewards) and about a third fewer tokens on short prompts. Where it cannot
    be used (attention other than sdpa or eager, packing, a sliding attention window shorter than max_length,
    a reward model without a `score` head) batches keep the ordinary layout, saying so in one log line."""
    share_prompt_row_tokens: int = 128
    """With share_prompt: short pairs share rows of up to this many tokens (or the batch's longest pair), filled
    to even lengths, where that saves at least 10% of the padded positions (longer rows cost attention); 0: one
    pair per row. See data.collators.share_prompt_batch."""
    group_by_length: bool = False
    """Batch rows of similar length together (less padding); see data.collators.length_grouped_batches."""
    cache_dir: str | None = None
    """Where tokenised datasets and generated synthetic files are cached; None: .cache/data."""
    synthetic_size: int = 2000
    """Training rows generated for path="synthetic" (test split: a tenth of it, at least 50)."""
