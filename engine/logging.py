"""What a run reports: TensorBoard scalars, one JSON line per logged step, and a console progress bar.

Only the main process writes; the others get a logger that keeps the history and writes nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm


class RunLogger:
    """Writes `<output_dir>/tensorboard/` events and `<output_dir>/metrics.jsonl`, and draws a tqdm bar
    (steps done, rate, ETA, and the latest loss and learning rate)."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        progress_bar: bool = True,
        desc: str = "train",
    ):
        self.enabled = enabled
        self.history: list[dict[str, float]] = []
        self.writer = None
        self.shown: dict[str, str] = {}
        self.jsonl = Path(output_dir) / "metrics.jsonl"
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run drops whatever the interrupted run logged after its checkpoint.
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)
            kept = []
            if start_step and self.jsonl.exists():
                kept = [line for line in self.jsonl.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            disable=not (enabled and progress_bar),
        )

    def advance(self) -> None:
        """One optimizer step done."""
        self.bar.update(1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{key: float(value) for key, value in metrics.items()}}
        self.history.append(record)
        if not self.enabled:
            return
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        with self.jsonl.open("a") as file:
            file.write(json.dumps(record) + "\n")
        self.shown.update({key: _short(record[key]) for key in ("loss", "eval/loss", "lr") if key in record})
        self.bar.set_postfix(self.shown, refresh=False)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def write(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _short(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.3e}" if abs(value) < 1e-3 else f"{value:.4f}"
