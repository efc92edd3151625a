"""Label preference pairs with an AI judge (RLAIF): soft labels from a causal LM's answer-label probabilities.

    python -m engine.label --judge JUDGE --constitution configs/rlaif/constitution.txt \
        --input pairs.jsonl --output labelled.jsonl [--template FILE] [--labels 1 2] [--min-confidence 0.2]

Input rows (JSON lines) hold a `prompt` and two or more responses: `chosen` and `rejected` (one pair, shown as
A = chosen, B = rejected), or a `responses` list (the output of `engine.generate --num-samples K`), from which
`--pairs all` forms every pair (i, j), i < j, K(K-1)/2 of them, and `--pairs adjacent` the K - 1 pairs
(i, i + 1). A pair whose two responses are the same text is skipped and counted.

The judge is any Hugging Face causal LM (a hub id, a local directory, an adapter on its base). Its prompt is
the comparison template (default configs/rlaif/compare_template.txt) with {constitution} (the text of the
`--constitution` file), {prompt}, {response_1} and {response_2} filled in, formatted as one user turn of the
judge's chat template when it has one (`--judge-format auto`; `plain` uses the text as it is). Label 1 means
"response 1 is better". The judge's next-token probabilities of the two labels, renormalised over them, are
read with A first and with B first and averaged (rollout.judge.compare):

    p          = (P(1 | A, B) + P(2 | B, A)) / 2, the probability that A is preferred
    soft_label = max(p, 1 - p), the probability that the written `chosen` is preferred (>= 0.5)
    confidence = |2p - 1| in [0, 1]: 0 when the two orders cancel (no preference), 1 when both are certain

Each output row is {"prompt", "chosen", "rejected", "soft_label", "confidence"}, chosen the response the judge
prefers (A on an exact tie); pairs with confidence below `--min-confidence` are dropped. The output is a
preference file for `data.path`: the soft_reward and soft_dpo objectives train on its soft labels, any other
preference objective on its hard ones. A summary is printed and written as JSON (`--report`, default
<output>.report.json): rows, pairs, skipped, dropped, kept, mean confidence and soft label, and with
`--compare-with package.module:function` (a reward function, e.g. data.synthetic:judge_reward) how often the
judge's choice is the one that function scores higher, on the pairs where it does not tie.

A real judge is a strong instruction model; configs/rlaif/README.md shows the whole loop on the built-in task
with a tiny judge trained for the demo.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.tiny import REPO_ROOT
from rollout.judge import PAIR_FIELDS, Comparison, Judge, check_template, compare, label_token_ids

CONFIGS = REPO_ROOT / "configs" / "rlaif"
COMPARE_TEMPLATE = CONFIGS / "compare_template.txt"
SCORE_TEMPLATE = CONFIGS / "score_template.txt"
DEFAULT_LABELS = ("1", "2")
JUDGE_FORMATS = ("auto", "plain")
PAIRINGS = ("all", "adjacent")


def read_template(path: str | Path) -> str:
    """A judge template file's text, its final newline dropped (the judge's answer follows the last line)."""
    return Path(path).read_text().removesuffix("\n")


def judge_formatter(tokenizer, judge_format: str = "auto"):
    """The data layer's formatter for judge prompts: one user turn of the tokenizer's chat template (`auto`,
    when it has one) or the text as it is (`plain`), BOS once; so a judge fine-tuned on rows
    {"prompt": filled template, "completion": label} reads the same ids here."""
    from data.config import DataConfig
    from data.tokenize import Formatter

    if judge_format not in JUDGE_FORMATS:
        raise ValueError(f"judge format {judge_format!r} is not one of {JUDGE_FORMATS}")
    cfg = DataConfig(template=None if judge_format == "auto" else "plain", prompt_format="{prompt}",
                     max_length=1 << 30, max_prompt_length=None)
    return Formatter(cfg, tokenizer)


def load_judge(name_or_path: str, *, labels: Sequence[str] = DEFAULT_LABELS, judge_format: str = "auto",
               dtype: str = "float32", attn_implementation: str = "auto", micro_batch_size: int = 16,
               device: str | torch.device | None = None) -> Judge:
    """A frozen judge from a path or hub id (full model or adapter), its labels checked before the weights load.

    Args:
        labels: the answer labels; each must be one token of the judge's tokenizer (a ValueError says which
            is not).
        judge_format: "auto" (the tokenizer's chat template if it has one) or "plain" (see `judge_formatter`).
        device: where the model runs; None: CUDA when available, else the CPU.
    """
    from engine.generate import load_model
    from engine.models import load_tokenizer

    tokenizer = load_tokenizer(name_or_path)
    formatter = judge_formatter(tokenizer, judge_format)
    label_ids = label_token_ids(formatter.encode, labels)
    model = load_model(name_or_path, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def encode(text: str) -> list[int]:
        return formatter.prompt_ids([{"role": "user", "content": text}])

    return Judge(model, encode, label_ids, tokenizer.pad_token_id, tuple(labels), micro_batch_size)


@dataclass(frozen=True)
class Pair:
    prompt: str
    a: str  # shown first in the first order; the input's chosen for a chosen/rejected row
    b: str


def read_pairs(path: str | Path, pairing: str = "all") -> tuple[list[Pair], dict[str, int]]:
    """The pairs of a JSON-lines file (module docstring) and the counts: rows, pairs, skipped_identical."""
    if pairing not in PAIRINGS:
        raise ValueError(f"--pairs must be one of {PAIRINGS}, got {pairing!r}")
    pairs, counts = [], {"rows": 0, "pairs_formed": 0, "skipped_identical": 0}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        row = json.loads(line)
        lower = {str(k).lower(): v for k, v in row.items()} if isinstance(row, dict) else {}
        prompt = lower.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: expected a non-empty string 'prompt', got keys {sorted(lower)}")
        if "responses" in lower:
            responses = lower["responses"]
            if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
                raise ValueError(f"{where}: 'responses' must be a list of two or more strings")
            k = len(responses)
            index = [(i, j) for i in range(k) for j in range(i + 1, k)] if pairing == "all" else \
                [(i, i + 1) for i in range(k - 1)]
            candidates = [(responses[i], responses[j]) for i, j in index]
        elif "chosen" in lower and "rejected" in lower:
            if not isinstance(lower["chosen"], str) or not isinstance(lower["rejected"], str):
                raise ValueError(f"{where}: 'chosen' and 'rejected' must be strings")
            candidates = [(lower["chosen"], lower["rejected"])]
        else:
            raise ValueError(f"{where}: expected 'chosen' and 'rejected', or a 'responses' list, beside 'prompt'; "
                             f"got keys {sorted(lower)}")
        counts["rows"] += 1
        for a, b in candidates:
            counts["pairs_formed"] += 1
            if a == b:
                counts["skipped_identical"] += 1
                continue
            pairs.append(Pair(prompt, a, b))
    if not counts["rows"]:
        raise ValueError(f"{path}: no rows")
    return pairs, counts


def labelled_rows(pairs: Sequence[Pair], judged: Comparison, min_confidence: float) -> list[dict]:
    """The kept pairs as preference rows, chosen the preferred response (A when p = 1/2 exactly)."""
    rows = []
    for pair, p, confidence in zip(pairs, judged.p.tolist(), judged.confidence.tolist()):
        if confidence < min_confidence:
            continue
        chosen, rejected = (pair.a, pair.b) if p >= 0.5 else (pair.b, pair.a)
        rows.append({"prompt": pair.prompt, "chosen": chosen, "rejected": rejected,
                     "soft_label": max(p, 1.0 - p), "confidence": confidence})
    return rows


def agreement(pairs: Sequence[Pair], judged: Comparison, score_fn: Callable, min_confidence: float) -> dict:
    """How often the judge picks the response `score_fn` scores higher, over the pairs it does not tie.

    A pair the judge ties exactly (p = 1/2) counts as a disagreement. Returned: `pairs` (not tied by
    score_fn), `agree` (their fraction the judge gets right), and the same over the pairs kept at
    `min_confidence` (`kept_pairs`, `kept_agree`)."""
    prompts = [pair.prompt for pair in pairs]
    score_a = [float(x) for x in score_fn(prompts, [pair.a for pair in pairs])]
    score_b = [float(x) for x in score_fn(prompts, [pair.b for pair in pairs])]
    right, kept_right, untied, kept = 0, 0, 0, 0
    for sa, sb, p, confidence in zip(score_a, score_b, judged.p.tolist(), judged.confidence.tolist()):
        if sa == sb:
            continue
        correct = (p > 0.5 and sa > sb) or (p < 0.5 and sb > sa)
        untied += 1
        right += correct
        if confidence >= min_confidence:
            kept += 1
            kept_right += correct
    return {"pairs": untied, "agree": right / untied if untied else None,
            "kept_pairs": kept, "kept_agree": kept_right / kept if kept else None}


def label_pairs(judge: Judge, template: str, constitution: str, pairs: Sequence[Pair], *, min_confidence: float = 0.0,
                score_fn: Callable | None = None, progress: Callable[[int], None] | None = None
                ) -> tuple[list[dict], dict]:
    """Judge every pair in both orders and keep those at `min_confidence` or above.

    Returns:
        the labelled rows (`labelled_rows`) and a report: labels, label_ids, judged, min_confidence,
        dropped_low_confidence, kept, mean_confidence, mean_soft_label, position_bias (P(label 1) averaged
        over both orders: 0.5 for a judge without one), and with `score_fn` the `agreement` dict.
    """
    # 1. Both orders of every pair through the judge, a micro-batch at a time.
    judged = compare(judge, template, constitution, [p.prompt for p in pairs], [p.a for p in pairs],
                     [p.b for p in pairs], progress=progress)
    # 2. Preferred response first, soft label and confidence; drop the pairs below the threshold.
    rows = labelled_rows(pairs, judged, min_confidence)
    some = len(pairs) > 0
    report = {
        "labels": list(judge.labels), "label_ids": list(judge.label_ids), "judged": len(pairs),
        "min_confidence": min_confidence, "dropped_low_confidence": len(pairs) - len(rows), "kept": len(rows),
        "mean_confidence": float(judged.confidence.mean()) if some else None,
        "mean_soft_label": float(torch.maximum(judged.p, 1 - judged.p).mean()) if some else None,
        "position_bias": float((judged.q_ab + judged.q_ba).mean() / 2) if some else None,
    }
    if score_fn is not None and some:
        report["agreement"] = agreement(pairs, judged, score_fn, min_confidence)
    return rows, report


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.label", description=__doc__.split("\n\n")[0])
    parser.add_argument("--judge", required=True, help="the judge: a causal LM's path or hub id (full or adapter)")
    parser.add_argument("--constitution", required=True, help="a text file of the principles to judge by")
    parser.add_argument("--input", required=True, help="JSON lines: prompt + chosen/rejected, or prompt + responses")
    parser.add_argument("--output", required=True, help="JSON lines of labelled preference pairs")
    parser.add_argument("--template", default=str(COMPARE_TEMPLATE),
                        help="the judge prompt, with {constitution}, {prompt}, {response_1}, {response_2}")
    parser.add_argument("--labels", nargs=2, default=list(DEFAULT_LABELS), metavar=("FIRST", "SECOND"),
                        help="the answers meaning 'response 1 is better' and 'response 2 is better'; one token each")
    parser.add_argument("--min-confidence", type=float, default=0.0,
                        help="drop pairs whose confidence |2p - 1| is below this (0 keeps every pair)")
    parser.add_argument("--pairs", choices=PAIRINGS, default="all",
                        help="with a responses list: every pair (all) or neighbours only (adjacent)")
    parser.add_argument("--batch-size", type=int, default=16, help="judge prompts per forward")
    parser.add_argument("--judge-format", choices=JUDGE_FORMATS, default="auto",
                        help="auto: one user turn of the judge's chat template when it has one; plain: the text as is")
    parser.add_argument("--compare-with", default=None, metavar="package.module:function",
                        help="report the judge's agreement with this reward function on the pairs it does not tie")
    parser.add_argument("--report", default=None, help="the JSON summary (default: <output>.report.json)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn-implementation", default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> dict:
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from engine.hostmem import keep_freed_memory
    from rollout.scoring import load_reward_function

    keep_freed_memory()
    args = parse_args(argv)
    # everything that can be wrong with the settings or the files is found before the judge loads
    if not 0.0 <= args.min_confidence <= 1.0:
        raise SystemExit(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        template = read_template(args.template)
        constitution = Path(args.constitution).read_text().strip()
        check_template(template, PAIR_FIELDS, f"--template {args.template}")
        pairs, counts = read_pairs(args.input, args.pairs)
        score_fn = load_reward_function(args.compare_with) if args.compare_with else None
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    hf_logging.disable_progress_bar()
    try:
        judge = load_judge(args.judge, labels=args.labels, judge_format=args.judge_format, dtype=args.dtype,
                           attn_implementation=args.attn_implementation, micro_batch_size=args.batch_size)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None

    with tqdm(total=2 * len(pairs), desc="judging", unit="prompt", dynamic_ncols=True,
              disable=args.no_progress) as bar:
        rows, report = label_pairs(judge, template, constitution, pairs, min_confidence=args.min_confidence,
                                   score_fn=score_fn, progress=bar.update)
    report = {"judge": args.judge, "constitution": args.constitution, "template": args.template,
              "input": args.input, "pairing": args.pairs, **counts, **report}
    if "agreement" in report:
        report["agreement"] = {"with": args.compare_with, **report["agreement"]}
    # The labelled pairs and the report, each written whole or not at all.
    write_atomic(Path(args.output), "".join(json.dumps(row) + "\n" for row in rows))
    report_path = Path(args.report) if args.report else Path(args.output).with_suffix(".report.json")
    write_atomic(report_path, json.dumps(report, indent=2) + "\n")
    print(summary(report), file=sys.stderr)
    return report


def summary(report: dict) -> str:
    """The printed lines of a labelling report."""
    lines = [f"{report['rows']} rows -> {report['pairs_formed']} pairs ({report['pairing']}); "
             f"{report['skipped_identical']} skipped (identical responses); {report['judged']} judged in both orders",
             f"kept {report['kept']}, dropped {report['dropped_low_confidence']} below confidence "
             f"{report['min_confidence']:g}"]
    if report["judged"]:
        lines.append(f"mean confidence {report['mean_confidence']:.3f}, mean soft label {report['mean_soft_label']:.3f}"
                     f", P(label 1) averaged over both orders {report['position_bias']:.3f} (0.5: no position bias)")
    if "agreement" in report:
        a = report["agreement"]
        agree, kept = (("n/a" if x is None else f"{x:.3f}") for x in (a["agree"], a["kept_agree"]))
        lines.append(f"agreement with {a['with']}: {agree} of {a['pairs']} pairs it does not tie; "
                     f"{kept} of the {a['kept_pairs']} kept")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cli() -> None:
    from engine.generate import exit_2_on_config_error

    exit_2_on_config_error(main)


if __name__ == "__main__":
    cli()
