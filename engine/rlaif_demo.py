"""Training rows for the RLAIF demo's tiny judge: the sorting task's comparisons as judge prompts and answers.

    python -m engine.rlaif_demo --out runs/rlaif/judge_sft.jsonl --num-comparisons 20000
    python -m engine.rlaif_demo --out runs/rlaif/judge_sft.jsonl --samples runs/rlaif/judge_samples.jsonl

Each comparison of data.synthetic.comparisons (two answers to a prompt, the better one known from the task's
judge) becomes two SFT rows, one per order: {"prompt": the comparison template filled with the constitution,
the prompt and the two answers, "completion": the label of the better one}. With `--samples` (the output of
`engine.generate --num-samples K`: a prompt and K sampled responses) the comparisons are instead every pair of
a prompt's samples that data.synthetic.judge does not tie, so the judge learns the mistakes a policy makes
rather than the synthetic corruptions (`sample_comparisons`). An SFT run on them
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

from data.synthetic import comparisons, judge
from engine.label import COMPARE_TEMPLATE, DEFAULT_LABELS, read_template, write_atomic
from rollout.judge import PAIR_FIELDS, check_template, fill

CONSTITUTION = COMPARE_TEMPLATE.with_name("constitution.txt")


def sample_comparisons(rows: Iterable[dict]) -> list[dict]:
    """The comparisons in rows of {"prompt", "responses": [...]}: every pair (i, j), i < j, of a prompt's
    responses that data.synthetic.judge scores differently, as {"prompt", "response_1", "response_2",
    "better": 1 or 2} (the rows of data.synthetic.comparisons)."""
    out = []
    for row in rows:
        responses = row["responses"]
        scores = [judge(row["prompt"], r) for r in responses]
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                if scores[i] != scores[j]:
                    out.append({"prompt": row["prompt"], "response_1": responses[i], "response_2": responses[j],
                                "better": 1 if scores[i] > scores[j] else 2})
    return out


def score_digit(prompt: str, response: str) -> str:
    """data.synthetic.judge's score of a response in tenths, rounded down, as one digit "0" to "9" (1.0 is "9")."""
    return str(min(9, int(judge(prompt, response) * 10)))


def span_prefix(template: str, field: str) -> str:
    """The template up to the end of the line that holds `{field}`: the judge prompt as it reads once that
    response has been shown."""
    end = template.index("{" + field + "}")
    newline = template.find("\n", end)
    return template if newline < 0 else template[:newline]


def judge_rows(n: int, *, template: str, constitution: str, labels=DEFAULT_LABELS, seed: int = 0,
               max_corruptions: int = 3, samples: list[dict] | None = None, score_rows: bool = False) -> list[dict]:
    """2n SFT rows: each of `n` comparisons in both orders, the completion the label of the better answer.
    The comparisons are data.synthetic.comparisons(n, seed, max_corruptions), or with `samples` (rows of a
    prompt and its responses) the first `n` of `sample_comparisons(samples)` (all of them when n is None).

    With `score_rows`, each comparison also gives two rows that rate one answer where the prompt has just shown
    it, in the comparison's first order: the template up to the end of the {response_1} line, completion
    `score_digit` of response 1, and up to the end of the {response_2} line, completion that of response 2
    (4n rows in all). They teach a small judge
    to summarise each answer at its end, which its comparison then reads; the template must not end on the
    {response_2} line, or those rows would share the comparison's prompt."""
    check_template(template, PAIR_FIELDS)
    if score_rows and span_prefix(template, "response_2") == template:
        raise ValueError("score rows need a template that goes on after the {response_2} line (a question, say)")
    rows = []
    chosen = comparisons(n, seed=seed, max_corruptions=max_corruptions) if samples is None \
        else sample_comparisons(samples)[:n]
    for c in chosen:
        first, second = c["response_1"], c["response_2"]
        for r1, r2, better in ((first, second, c["better"]), (second, first, 3 - c["better"])):
            text = fill(template, constitution=constitution, prompt=c["prompt"], response_1=r1, response_2=r2)
            rows.append({"prompt": text, "completion": labels[better - 1]})
        if score_rows:
            values = dict(constitution=constitution, prompt=c["prompt"], response_1=first, response_2=second)
            for field, answer in (("response_1", first), ("response_2", second)):
                rows.append({"prompt": fill(span_prefix(template, field), **values),
                             "completion": score_digit(c["prompt"], answer)})
    return rows


def main(argv: Iterable[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m engine.rlaif_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON lines of prompt/completion rows")
    parser.add_argument("--num-comparisons", type=int, default=None,
                        help="comparisons; each gives two rows (default: 20000, or with --samples all of them)")
    parser.add_argument("--samples", default=None,
                        help="JSON lines of prompt + responses (engine.generate --num-samples K): compare these")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-corruptions", type=int, default=3, help="corruptions per answer, at most")
    parser.add_argument("--template", default=str(COMPARE_TEMPLATE))
    parser.add_argument("--constitution", default=str(CONSTITUTION))
    parser.add_argument("--score-rows", action="store_true",
                        help="also rate each answer alone where the template has just shown it (judge_rows)")
    parser.add_argument("--labels", nargs=2, default=list(DEFAULT_LABELS), metavar=("FIRST", "SECOND"))
    args = parser.parse_args(None if argv is None else list(argv))
    samples = None
    if args.samples is not None:
        samples = [json.loads(line) for line in Path(args.samples).read_text().splitlines() if line.strip()]
        bad = [i for i, row in enumerate(samples, start=1) if not isinstance(row.get("responses"), list)]
        if bad:
            raise SystemExit(f"{args.samples}, line {bad[0]}: expected a 'responses' list (engine.generate "
                             "--num-samples K with K >= 2)")
    n = args.num_comparisons if args.num_comparisons is not None or samples is not None else 20000
    rows = judge_rows(n, template=read_template(args.template),
                      constitution=Path(args.constitution).read_text().strip(), labels=tuple(args.labels),
                      seed=args.seed, max_corruptions=args.max_corruptions, samples=samples,
                      score_rows=args.score_rows)
    write_atomic(Path(args.out), "".join(json.dumps(row) + "\n" for row in rows))
    source = f"comparisons of {args.samples}" if samples is not None else "comparisons"
    per = 4 if args.score_rows else 2
    kinds = "2 orders + 2 ratings" if args.score_rows else "2 orders"
    print(f"{len(rows)} judge rows ({len(rows) // per} {source} x {kinds}) -> {args.out}")
    return rows


if __name__ == "__main__":
    main()
