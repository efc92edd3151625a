"""The run report: report.md and a self-contained report.html (plots inlined as base64 PNG) in the run directory.

    python -m engine.report runs/quickstart

It reads what the pipeline leaves behind: `eval/<method>.json` (engine/evaluate.py), `<stage>/done.json`
(training time) and `<stage>/tensorboard/` (the curves, read back with TensorBoard's EventAccumulator). The
table puts every method against the SFT baseline; `summary.json` holds the same numbers for scripts and tests.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

STAGES = ("sft", "reward", "dpo", "orpo", "ppo", "grpo", "rloo")
# (column, metric key in eval/<method>.json, format)
COLUMNS = (
    ("judge score", "judge/score", "{:.3f}"),
    ("solved", "judge/solved", "{:.2f}"),
    ("RM score", "reward_model/score", "{:+.2f}"),
    ("win rate vs SFT", "reward_model/win_rate", "{:.2f}"),
    ("KL to SFT", "objective/kl", "{:.2f}"),
    ("length", "response/length", "{:.1f}"),
    ("EOS", "response/eos", "{:.2f}"),
)
# the curves worth a look for each stage, in order of preference
CURVES = {
    "sft": ("loss", "eval/loss", "eval/token_accuracy"),
    "reward": ("loss", "rewards/accuracies", "eval/rewards/accuracies"),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"),
    "orpo": ("loss", "rewards/accuracies", "loss/nll", "logps/log_odds_ratio"),
    "ppo": ("objective/score", "objective/kl", "rollout/response_length", "policy/clipfrac"),
    "grpo": ("objective/score", "groups/reward_std", "policy/kl_ref", "rollout/response_length"),
    "rloo": ("objective/score", "groups/reward_std", "objective/kl", "rollout/response_length"),
}


def read_scalars(tensorboard_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's TensorBoard event files: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def plot_curves(stage: str, scalars: Mapping[str, list[tuple[int, float]]]) -> bytes | None:
    """A PNG with one panel per curve of `CURVES[stage]` that the run logged; None when it logged none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = [tag for tag in CURVES.get(stage, ()) if scalars.get(tag)][:4]
    if not tags:
        return None
    figure, axes = plt.subplots(1, len(tags), figsize=(3.2 * len(tags), 2.6), squeeze=False)
    for axis, tag in zip(axes[0], tags):
        steps, values = zip(*scalars[tag])
        axis.plot(steps, values, marker="." if len(steps) < 30 else None)
        axis.set_title(tag, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    figure.suptitle(stage, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def table_rows(results: Mapping[str, dict], seconds: Mapping[str, float]) -> list[list[str]]:
    """Header and one row per method: the COLUMNS, then training time."""
    rows = [["method", *(name for name, _, _ in COLUMNS), "training time"]]
    for method, result in results.items():
        metrics = result["metrics"]
        cells = [_format(fmt, metrics.get(key)) for _, key, fmt in COLUMNS]
        rows.append([method, *cells, f"{seconds[method]:.0f} s" if method in seconds else "-"])
    return rows


def _format(fmt: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown_table(rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]


def side_by_side(results: Mapping[str, dict], n: int = 6) -> list[dict]:
    """Per prompt: the SFT response and each method's, with judge and reward-model scores."""
    methods = [m for m in results if results[m].get("samples")]
    if not methods:
        return []
    first = results[methods[0]]["samples"]
    out = []
    for i, sample in enumerate(first[:n]):
        row = {"prompt": sample["prompt"], "responses": {}}
        if "reference_response" in sample:
            row["responses"]["SFT (reference)"] = _scored(sample, "reference_response", "judge_reference",
                                                          "reward_reference")
        for method in methods:
            samples = results[method]["samples"]
            if i < len(samples) and samples[i]["prompt"] == sample["prompt"]:
                row["responses"][method] = _scored(samples[i], "response", "judge", "reward")
        out.append(row)
    return out


def _scored(sample: dict, text: str, judge: str, reward: str) -> tuple[str, str]:
    scores = [f"judge {sample[judge]:.2f}" if judge in sample else "",
              f"RM {sample[reward]:+.2f}" if reward in sample else ""]
    return sample[text], ", ".join(s for s in scores if s)


def write_report(run_dir: str | Path, results: Mapping[str, dict] | None = None,
                 seconds: Mapping[str, float] | None = None, *, notes: Iterable[str] = ()) -> dict:
    """Write report.md, report.html, plots/<stage>.png and summary.json into `run_dir`; returns the summary.

    `results` defaults to the eval/*.json files, `seconds` to the done.json of each stage."""
    run_dir = Path(run_dir)
    if results is None:
        results = {path.stem: json.loads(path.read_text()) for path in sorted((run_dir / "eval").glob("*.json"))}
        order = {m: i for i, m in enumerate(STAGES)}
        results = dict(sorted(results.items(), key=lambda item: order.get(item[0], len(order))))
    if seconds is None:
        seconds = {stage: json.loads((run_dir / stage / "done.json").read_text())["seconds"]
                   for stage in STAGES if (run_dir / stage / "done.json").exists()}
    notes = list(notes)

    rows = table_rows(results, seconds)
    accuracy = next((r["metrics"]["pairs/reward_model_accuracy"] for r in results.values()
                     if "pairs/reward_model_accuracy" in r["metrics"]), None)
    baseline = results.get("sft", {}).get("metrics", {}).get("judge/score")
    summary = {
        "judge_score": {m: r["metrics"].get("judge/score") for m, r in results.items()},
        "reward_model_pair_accuracy": accuracy,
        "training_seconds": dict(seconds),
        "metrics": {m: r["metrics"] for m, r in results.items()},
        "notes": notes,
    }

    plots = {}
    (run_dir / "plots").mkdir(exist_ok=True)
    for stage in STAGES:
        if (run_dir / stage / "tensorboard").is_dir():
            png = plot_curves(stage, read_scalars(run_dir / stage / "tensorboard"))
            if png is not None:
                plots[stage] = png
                (run_dir / "plots" / f"{stage}.png").write_bytes(png)
    samples = side_by_side(results)

    intro = ("Every policy below answered the same held-out prompts (one fixed sampling seed), scored by the task's "
             "judge and by the reward model; win rate and KL are measured against the SFT model, the starting "
             "point of DPO, ORPO and PPO.")
    md = ["# Quickstart report", "", intro, "", *markdown_table(rows), ""]
    if accuracy is not None:
        md += [f"Reward model accuracy on held-out preference pairs: **{accuracy:.3f}**.", ""]
    if baseline is not None:
        gains = [f"{m} {r['metrics']['judge/score'] - baseline:+.3f}" for m, r in results.items()
                 if m != "sft" and "judge/score" in r["metrics"]]
        if gains:
            md += ["Judge score against SFT: " + ", ".join(gains) + ".", ""]
    md += [f"- {note}" for note in notes] + ([""] if notes else [])
    md += ["## Training curves", ""] + [f"![{stage}](plots/{stage}.png)" for stage in plots] + [""]
    md += ["## Side-by-side samples", ""]
    for sample in samples:
        md += [f"**{sample['prompt']}**", "", "| model | response | scores |", "|---|---|---|"]
        md += [f"| {name} | `{text}` | {scores} |" for name, (text, scores) in sample["responses"].items()]
        md.append("")
    (run_dir / "report.md").write_text("\n".join(md))
    (run_dir / "report.html").write_text(_html(rows, accuracy, notes, plots, samples, intro))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["table"] = markdown_table(rows)
    return summary


def _html(rows, accuracy, notes, plots, samples, intro) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Quickstart report</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
             "th{background:#f4f4f4}code{background:#f6f6f6}img{max-width:100%}",
             "</style></head><body><h1>Quickstart report</h1>", f"<p>{e(intro)}</p><table>"]
    parts.append("<tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows[1:]]
    parts.append("</table>")
    if accuracy is not None:
        parts.append(f"<p>Reward model accuracy on held-out preference pairs: <b>{accuracy:.3f}</b>.</p>")
    if notes:
        parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Training curves</h2>")
    for stage, png in plots.items():
        parts.append(f"<p><img alt='{e(stage)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>")
    parts.append("<h2>Side-by-side samples</h2>")
    for sample in samples:
        parts.append(f"<h3>{e(sample['prompt'])}</h3><table><tr><th>model</th><th>response</th><th>scores</th></tr>")
        parts += [f"<tr><td>{e(name)}</td><td><code>{e(text)}</code></td><td>{e(scores)}</td></tr>"
                  for name, (text, scores) in sample["responses"].items()]
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def main(argv: Iterable[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m engine.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a pipeline run directory, e.g. runs/quickstart")
    args = parser.parse_args(None if argv is None else list(argv))
    summary = write_report(args.run_dir)
    print("\n".join(summary["table"]))
    return summary


if __name__ == "__main__":
    main()
