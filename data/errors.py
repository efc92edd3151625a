"""One exception type for bad data, with messages that say where, what was found and what to do."""

from __future__ import annotations

from collections.abc import Mapping


class DataError(ValueError):
    """Bad input data or a tokenizer that cannot be used as configured; the message names the fix."""


def row_error(where: str, record: Mapping, problem: str, expected: str, fix: str = "") -> DataError:
    """Error for one row; `where` is e.g. "train.jsonl, line 7" or "hub:org/name[train], row 12"."""
    keys = sorted(str(k) for k, v in record.items() if v is not None)
    message = f"{where}: {problem}. The row has keys {keys}; expected {expected}."
    return DataError(f"{message} {fix}".strip())
