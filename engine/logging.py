"""What a run reports: one JSON line per logged step, TensorBoard scalars, the W&B and MLflow trackers that
train.py started on the accelerator (engine/tracking.py), and a console progress bar.

Only the main process writes; the others get a logger that keeps the history and writes nothing.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from tqdm.auto import tqdm


class RunLogger:
    """Writes `<output_dir>/metrics.jsonl`, `<output_dir>/tensorboard/` events (with `tensorboard`) and the
    accelerator's trackers (`accelerator.log`), and draws a tqdm bar (steps done, rate, ETA, and the latest
    loss and learning rate)."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        progress_bar: bool = True,
        desc: str = "train",
        accelerator=None,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.accelerator = accelerator if accelerator is not None and accelerator.trackers else None
        self.history: list[dict[str, float]] = []
        self.writer = None
        self.shown: dict[str, str] = {}
        self.jsonl = Path(output_dir) / "metrics.jsonl"
        if enabled:
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # A resumed run drops whatever the interrupted run logged after its checkpoint.
                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)
            kept = []
            if start_step and self.jsonl.exists():
                kept = [line for line in _whole_lines(self.jsonl) if json.loads(line)["step"] <= start_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            disable=not (enabled and progress_bar),
        )

    @classmethod
    def for_run(cls, cfg, accelerator, *, total_steps: int, start_step: int, desc: str) -> RunLogger:
        """The logger of a training run: its output_dir, `logging` settings and the accelerator's trackers."""
        from engine.tracking import resolve

        return cls(cfg.output_dir, total_steps=total_steps, start_step=start_step,
                   enabled=accelerator.is_main_process, progress_bar=cfg.logging.progress_bar, desc=desc,
                   accelerator=accelerator, tensorboard="tensorboard" in resolve(cfg.logging.report_to))

    def advance(self) -> None:
        """One optimizer step done."""
        self.bar.update(1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{key: float(value) for key, value in metrics.items()}}
        self.history.append(record)
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)
        if self.accelerator is not None:
            from engine.tracking import log

            log(self.accelerator, {key: value for key, value in record.items() if key != "step"}, step)
        with self.jsonl.open("a") as file:
            file.write(json.dumps(record) + "\n")
        self.shown.update({key: _short(record[key]) for key in ("loss", "eval/loss", "lr") if key in record})
        self.bar.set_postfix(self.shown, refresh=False)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def table(self, tag: str, columns: list[str], rows: list[list], step: int = 0) -> None:
        """Rows of text and numbers: a markdown table in TensorBoard's text tab, a table in the trackers."""
        if not self.enabled:
            return
        if self.writer is not None:
            def cell(value) -> str:
                text = f"{value:.3f}" if isinstance(value, float) else str(value)
                return text.replace("|", "\\|").replace("\n", "<br>")

            lines = [" | ".join(columns), " | ".join("---" for _ in columns)]
            self.writer.add_text(tag, "\n".join(f"| {line} |" for line in
                                                 lines + [" | ".join(map(cell, row)) for row in rows]), step)
        if self.accelerator is not None:
            from engine.tracking import log_table

            log_table(self.accelerator.trackers, tag, columns, rows, step)

    def write(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _whole_lines(path: Path) -> list[str]:
    """The lines of metrics.jsonl; a last one torn by a kill mid-write is dropped, with a warning."""
    lines = path.read_text(errors="replace").splitlines()
    if lines:
        try:
            json.loads(lines[-1])["step"]
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{path}: dropped its last line, torn by an interrupted write: {lines[-1][:80]!r}",
                          stacklevel=3)
            lines.pop()
    return lines


def _short(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.3e}" if abs(value) < 1e-3 else f"{value:.4f}"
