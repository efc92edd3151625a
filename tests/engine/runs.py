"""Tiny in-process training runs through the real entry point, small enough for a CPU test suite."""

from __future__ import annotations

from pathlib import Path

from engine import train

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = REPO_ROOT / "configs" / "tiny"

# 32 training rows (pairs) in 4 micro-batches of 8: a few epochs fit in a dozen steps.
SMALL = [
    "logging.progress_bar=false",
    "logging.every_steps=1",
    "data.synthetic_size=200",
    "data.max_samples=32",
    "batch.global_batch_size=8",
    "batch.micro_batch_size=8",
    "eval.every_steps=0",
    "optim.warmup_steps=0",
]


def run(config: str, output_dir: Path, *overrides: str) -> train.RunResult:
    """`engine/train.py --config configs/tiny/<config>` in this process, on the small settings above."""
    return train.main(["--config", str(TINY / config), f"output_dir={output_dir}", *SMALL, *overrides])


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def series(result: train.RunResult, key: str) -> list[float]:
    return [record[key] for record in result.history if key in record]


def run_cli(config: str | Path, output_dir: Path, *overrides: str) -> tuple[int, str]:
    """`engine/train.py` as a user runs it, in this process: (exit code, stderr). An exception that escapes
    the entry point (what a user sees as a traceback) fails the calling test."""
    import contextlib
    import io
    import sys

    config = config if Path(config).is_absolute() else TINY / config
    stderr = io.StringIO()
    argv = sys.argv
    sys.argv = ["engine/train.py", "--config", str(config), f"output_dir={output_dir}", *SMALL, *overrides]
    try:
        with contextlib.redirect_stderr(stderr):
            train.cli()
    except SystemExit as stop:
        return stop.code, stderr.getvalue()
    finally:
        sys.argv = argv
    return 0, stderr.getvalue()
