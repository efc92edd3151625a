"""Training rows for the RLAIF demo's tiny judge: the sorting task's comparisons as judge prompts and answers.

    python -m engine.rlaif_demo --out runs/rlaif/judge_sft.jsonl --num-comparisons 20000

Each comparison of data.synthetic.comparisons (two answers to a prompt, the better one known from the task's
judge) becomes two SFT rows, one per order: {"prompt": the comparison template filled with the constitution,
the prompt and the two answers, "completion": the label of the better one}. An SFT run on them
(configs/rlaif/judge_sft.yaml) gives a judge that engine.label reads exactly as it was trained: the same
template, the same chat formatting, the answer label as the first response token.

This judge is for the demo only: it learns the task's own notion of better from the task's own labels, so it
shows the plumbing (labelling, soft labels, DPO on them) on a CPU. A real judge is a strong instruction model
prompted with a constitution; nothing here trains one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from data.synthetic import comparisons
from engine.label import COMPARE_TEMPLATE, DEFAULT_LABELS, read_template, write_atomic
from rollout.judge import PAIR_FIELDS, check_template, fill

CONSTITUTION = COMPARE_TEMPLATE.with_name("constitution.txt")


def judge_rows(n: int, *, template: str, constitution: str, labels=DEFAULT_LABELS, seed: int = 0,
               max_corruptions: int = 3) -> list[dict]:
    """2n SFT rows: each of `n` comparisons in both orders, the completion the label of the better answer."""
    check_template(template, PAIR_FIELDS)
    rows = []
    for c in comparisons(n, seed=seed, max_corruptions=max_corruptions):
        first, second = c["response_1"], c["response_2"]
        for r1, r2, better in ((first, second, c["better"]), (second, first, 3 - c["better"])):
            text = fill(template, constitution=constitution, prompt=c["prompt"], response_1=r1, response_2=r2)
            rows.append({"prompt": text, "completion": labels[better - 1]})
    return rows


def main(argv: Iterable[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m engine.rlaif_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON lines of prompt/completion rows")
    parser.add_argument("--num-comparisons", type=int, default=20000, help="comparisons; each gives two rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-corruptions", type=int, default=3, help="corruptions per answer, at most")
    parser.add_argument("--template", default=str(COMPARE_TEMPLATE))
    parser.add_argument("--constitution", default=str(CONSTITUTION))
    parser.add_argument("--labels", nargs=2, default=list(DEFAULT_LABELS), metavar=("FIRST", "SECOND"))
    args = parser.parse_args(None if argv is None else list(argv))
    rows = judge_rows(args.num_comparisons, template=read_template(args.template),
                      constitution=Path(args.constitution).read_text().strip(), labels=tuple(args.labels),
                      seed=args.seed, max_corruptions=args.max_corruptions)
    write_atomic(Path(args.out), "".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} judge rows ({args.num_comparisons} comparisons x 2 orders) -> {args.out}")
    return rows


if __name__ == "__main__":
    main()
