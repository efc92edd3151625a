"""The quickstart: every objective improving a tiny model on CPU, evaluated against the SFT baseline, in a report.

    python -m engine.pipeline [--out runs/quickstart] [--seed N] [--ci] [--jobs 2]

1. build the tiny Llama and its tokenizer (engine.tiny, cached);
2. SFT on the synthetic sorting task (data/synthetic.py);
3. on-policy preference pairs: four samples of the SFT model per training prompt, a correct one (judge 1.0)
   against the worst (engine/generate.py --pairs-by --min-chosen-score), into <out>/pairs.jsonl;
4. a reward model on the task's preference pairs, starting from the SFT model;
5. DPO and 6. ORPO on the on-policy pairs, 7. PPO (rewarded by the task's judge; configs/quickstart/ppo.yaml
   shows how to reward it with the reward model instead), and the critic-free 8. GRPO and 9. RLOO (4 samples
   per prompt, rewarded by the judge, no value head), each starting from the SFT model;
10. evaluation of every policy against the SFT model on held-out prompts and pairs (engine/evaluate.py);
11. report.md and report.html with the table, training curves and samples (engine/report.py).

Every step is an ordinary command, printed as it starts: `python -m engine.train` with a config from
configs/quickstart/, `python -m engine.generate` or `python -m engine.evaluate`. Steps whose inputs are ready
run side by side, `--jobs` at a time, each on `--threads` CPU threads (for a model this small one thread per
process is fastest). A training step is finished when its `final/` directory and `done.json` exist, an
evaluation when its JSON exists; a re-run skips finished steps, so an interrupted quickstart picks up where it
stopped. `--ci` is the test suite's shorter variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs" / "quickstart"
METHODS = ("sft", "dpo", "orpo", "ppo", "grpo", "rloo")
# (stage, the metric its progress line reports)
TRAINING = (("sft", "eval/loss"), ("reward", "eval/rewards/accuracies"), ("dpo", "rewards/accuracies"),
            ("orpo", "rewards/accuracies"), ("ppo", "objective/score"), ("grpo", "objective/score"),
            ("rloo", "objective/score"))
# the CI-sized variant: the same SFT and methods as the full quickstart, with pairs from 2000 prompts, a shorter
# reward model and 200 evaluation prompts. A 200-step SFT (0.682-0.707 on seeds 0-2) left DPO +0.011 over it,
# less than that SFT's seed spread; the full SFT on 200 prompts scores 0.719 / 0.739 / 0.731 (spread 0.020) and
# every method gains more than twice that on seed 0. The reward model runs beside the pairs step; its 120 steps
# at lr 1e-3 rank 0.825 of 200 held-out pairs.
CI_OVERRIDES = {"reward": ["max_steps=120", "optim.lr=1e-3"]}
PAIRS = "pairs.jsonl"
SAMPLING = ["--prompts", "synthetic", "--num-samples", "4", "--max-new-tokens", "16",
            "--pairs-by", "data.synthetic:judge_reward", "--min-chosen-score", "1", "--batch-size", "128"]
PAIRS_ARGS = [*SAMPLING, "--num-prompts", "4000"]
CI_PAIRS = [*SAMPLING, "--num-prompts", "2000"]
EVALUATION = ["--num-prompts", "500", "--num-pairs", "500"]
CI_EVALUATION = ["--num-prompts", "200", "--num-pairs", "200"]


@dataclass
class Step:
    name: str
    argv: list[str]
    needs: tuple[str, ...]
    done_path: Path
    log_path: Path
    training: bool = True
    headline: str | None = None
    """A training step's metric, read from its metrics.jsonl, for the line that says it is done."""
    resumes: bool = False
    """A training step whose command continues from its checkpoints (checkpoint.resume_from=latest): an
    unfinished run's directory is kept, not started over."""
    started: float = 0.0
    process: subprocess.Popen | None = field(default=None, repr=False)

    def is_done(self) -> bool:
        if self.training:
            return (self.done_path.parent / "final").is_dir() and self.done_path.exists()
        return self.done_path.exists()


def plan(out: Path, seed: int, ci: bool, report_to: str | None = None) -> list[Step]:
    """The steps of the quickstart in dependency order; `report_to` is every training run's logging.report_to."""
    sft_final, reward_final = out / "sft" / "final", out / "reward" / "final"
    steps = []
    for stage, _ in TRAINING:
        overrides = [f"output_dir={out / stage}", f"seed={seed}", "logging.progress_bar=false",
                     *([f"logging.report_to={report_to}"] if report_to else [])]
        needs: tuple[str, ...] = ()
        if stage != "sft":
            overrides.append(f"model.name_or_path={sft_final}")
            needs = ("sft",)
        argv = ["-m", "engine.train", "--config", str(CONFIGS / f"{stage}.yaml"), *overrides,
                *(CI_OVERRIDES.get(stage, []) if ci else [])]
        if stage in ("dpo", "orpo"):
            argv.append(f"data.path={out / PAIRS}")
            needs = ("sft", "pairs")
        steps.append(Step(stage, argv, needs, out / stage / "done.json", out / stage / "train.log",
                          headline=dict(TRAINING)[stage]))
        if stage == "sft":
            # on-policy preference pairs for DPO and ORPO: the SFT model's samples, a correct one against the worst
            argv = ["-m", "engine.generate", "--model", str(sft_final), "--output", str(out / PAIRS),
                    "--seed", str(seed), "--data-seed", str(seed), *(CI_PAIRS if ci else PAIRS_ARGS)]
            steps.append(Step("pairs", argv, ("sft",), out / PAIRS, out / "pairs.log", training=False))
    for method in METHODS:
        path = out / "eval" / f"{method}.json"
        argv = ["-m", "engine.evaluate", "--model", str(out / method / "final"), "--reference", str(sft_final),
                "--reward-model", str(reward_final), "--seed", str(seed), "--out", str(path),
                *(CI_EVALUATION if ci else EVALUATION)]
        needs = tuple(dict.fromkeys((method, "sft", "reward")))
        steps.append(Step(f"eval {method}", argv, needs, path, out / "eval" / f"{method}.log", training=False))
    return steps


def run(steps: list[Step], *, jobs: int, threads: int, log, first: int = 2, total: int | None = None
        ) -> dict[str, float]:
    """Run the unfinished steps, each once its needs are finished, at most `jobs` at a time; their progress
    lines are numbered from `first` of `total` (default: the quickstart's, one line before and after them).

    Returns the wall-clock seconds of each training step (read back from done.json for skipped ones)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO_ROOT)}
    total = len(steps) + first if total is None else total
    number = {step.name: index for index, step in enumerate(steps, start=first)}
    finished, pending, running = set(), [], []
    for step in steps:
        if step.is_done():
            finished.add(step.name)
            log(f"[{number[step.name]}/{total}] {step.name}: already finished, skipped")
        else:
            pending.append(step)
    try:
        while pending or running:
            for step in [s for s in pending if all(n in finished for n in s.needs)][: jobs - len(running)]:
                pending.remove(step)
                if step.training and not step.resumes:
                    shutil.rmtree(step.done_path.parent, ignore_errors=True)  # a half-finished run starts over
                step.log_path.parent.mkdir(parents=True, exist_ok=True)
                log(f"[{number[step.name]}/{total}] {step.name}: python {_show(step.argv)}")
                step.started = time.perf_counter()
                with step.log_path.open("w") as log_file:
                    step.process = subprocess.Popen([sys.executable, *step.argv], cwd=REPO_ROOT, env=env,
                                                    stdout=log_file, stderr=subprocess.STDOUT)
                running.append(step)
            time.sleep(0.2)
            for step in [s for s in running if s.process.poll() is not None]:
                running.remove(step)
                seconds = time.perf_counter() - step.started
                if step.process.returncode != 0:
                    tail = "".join(step.log_path.read_text().splitlines(keepends=True)[-15:])
                    raise RuntimeError(f"{step.name} failed (exit {step.process.returncode}); its log "
                                       f"{step.log_path} ends with:\n{tail}")
                headline = ""
                if step.training:
                    last = _last_metrics(step.done_path.parent / "metrics.jsonl")
                    step.done_path.write_text(json.dumps({"seconds": round(seconds, 1), "command": _show(step.argv),
                                                          "last": last}, indent=2) + "\n")
                    key = step.headline
                    headline = f"; final {key} {last[key]:.3f}" if key in last else ""
                finished.add(step.name)
                log(f"[{number[step.name]}/{total}] {step.name}: done in {seconds:.0f} s{headline}")
    finally:
        for step in running:
            step.process.kill()
    return {s.name: json.loads(s.done_path.read_text())["seconds"] for s in steps if s.training}


def main(argv: Iterable[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m engine.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="the run directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage and of evaluation sampling")
    parser.add_argument("--ci", action="store_true", help="the CI-sized variant: shorter stages, fewer prompts")
    parser.add_argument("--jobs", type=int, default=2, help="steps run side by side")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each step")
    parser.add_argument("--report-to", help="the training runs' logging.report_to, e.g. [tensorboard,wandb]; the "
                        "report is attached to each of their W&B or MLflow runs")
    args = parser.parse_args(None if argv is None else list(argv))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, flush=True)

    from engine.tiny import resolve_model_path

    steps = plan(out, args.seed, args.ci, report_to=args.report_to)
    total = len(steps) + 2
    log(f"[1/{total}] tiny model and tokenizer: {resolve_model_path('tiny')}")
    seconds = run(steps, jobs=args.jobs, threads=args.threads, log=log)

    from engine.report import write_report

    results = {m: json.loads((out / "eval" / f"{m}.json").read_text()) for m in METHODS}
    summary = write_report(out, results, seconds)
    log(f"[{total}/{total}] report: {out / 'report.md'}, {out / 'report.html'}")
    from engine import tracking

    for stage in seconds:
        with tracking.reopened(out / stage) as trackers:
            tracking.attach(trackers, [out / "report.md", out / "report.html"], "quickstart-report")
    for line in summary["table"]:
        log("    " + line)
    if summary["reward_model_pair_accuracy"] is not None:
        log(f"    reward model accuracy on held-out pairs: {summary['reward_model_pair_accuracy']:.3f}")
    log(f"quickstart done in {time.perf_counter() - started:.0f} s")
    return summary


def _last_metrics(path: Path) -> dict:
    """The latest value of every metric in a run's metrics.jsonl."""
    last: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            last.update(json.loads(line))
    return last


def _show(argv: list[str]) -> str:
    """The command with paths under the repository written relative to it."""
    root = str(REPO_ROOT) + os.sep
    return " ".join(shlex.quote(arg.replace(root, "")) for arg in argv)


if __name__ == "__main__":
    main()
