"""What the data layer read, dropped, cut and produced: printed and saved with every run."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PERCENTILES = (50, 90, 99, 100)


def percentiles(values: list[int]) -> dict[str, float]:
    """Nearest-rank percentiles p50 p90 p99 and the max (p100); zeros for an empty list."""
    if not values:
        return {f"p{q}": 0.0 for q in PERCENTILES}
    ordered = sorted(values)
    n = len(ordered)
    return {f"p{q}": float(ordered[min(n - 1, max(0, -(-q * n // 100) - 1))]) for q in PERCENTILES}


@dataclass
class SplitReport:
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    prompt_tokens: dict[str, float] = field(default_factory=dict)
    response_tokens: dict[str, float] = field(default_factory=dict)
    """Token-length percentiles are of the rows as read, before truncation."""
    prompt_truncated: float = 0.0
    """Fraction of kept rows whose prompt was cut (from the left)."""
    response_truncated: float = 0.0
    """Fraction of kept rows whose response was cut (from the right)."""

    @classmethod
    def from_stats(cls, rows_read: int, dropped: Counter, prompt_lens, response_lens, prompt_cut, response_cut):
        kept = len(prompt_lens)
        return cls(
            rows_read=rows_read,
            rows_kept=kept,
            dropped=dict(sorted(dropped.items())),
            prompt_tokens=percentiles(list(prompt_lens)),
            response_tokens=percentiles(list(response_lens)),
            prompt_truncated=sum(prompt_cut) / kept if kept else 0.0,
            response_truncated=sum(response_cut) / kept if kept else 0.0,
        )


@dataclass
class DataReport:
    family: str
    source: str
    row_format: str
    template: str
    fingerprint: str
    splits: dict[str, SplitReport] = field(default_factory=dict)
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        splits = {name: SplitReport(**s) for name, s in d.get("splits", {}).items()}
        return cls(**{**d, "splits": splits})

    def format(self) -> str:
        lines = [
            f"data: {self.family} rows from {self.source} (format {self.row_format}; {self.template})"
            + ("  [from cache]" if self.cached else ""),
        ]
        for name, s in self.splits.items():
            dropped = ", ".join(f"{k} {v}" for k, v in s.dropped.items()) or "none"
            lines += [
                f"  {name}: read {s.rows_read}, kept {s.rows_kept}, dropped: {dropped}",
                f"    prompt tokens   p50 {s.prompt_tokens['p50']:.0f}  p90 {s.prompt_tokens['p90']:.0f}  "
                f"p99 {s.prompt_tokens['p99']:.0f}  max {s.prompt_tokens['p100']:.0f}  "
                f"truncated {100 * s.prompt_truncated:.1f}%",
            ]
            if self.family == "prompt":
                continue
            lines += [
                f"    response tokens p50 {s.response_tokens['p50']:.0f}  p90 {s.response_tokens['p90']:.0f}  "
                f"p99 {s.response_tokens['p99']:.0f}  max {s.response_tokens['p100']:.0f}  "
                f"truncated {100 * s.response_truncated:.1f}%",
            ]
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write JSON to `path`, or to `path`/data_report.json when `path` is a directory."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "data_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path
