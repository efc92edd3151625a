"""Read rows from files, `save_to_disk` directories, the Hugging Face hub or the synthetic task.

Every source becomes `{split name: Split}`; a Split knows where each row came from, so later errors
can name the file and the line (or row) of a bad record.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.config import DataConfig
from data.errors import DataError

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
EVAL_SPLIT_NAMES = ("test", "validation", "valid", "eval", "dev")


@dataclass
class Split:
    """Rows of one split: a list of dicts (local files) or a `datasets.Dataset` (hub, disk)."""

    rows: Sequence[Mapping[str, Any]]
    source: str
    lines: list[int] | None = None
    """1-based line of each row in `source` (text formats); None: rows are numbered from 1."""
    numbers: list[int] | None = None
    """1-based row number of each row in the original split, once it has been sampled."""

    def where(self, index: int) -> str:
        if self.lines is not None:
            return f"{self.source}, line {self.lines[index]}"
        number = self.numbers[index] if self.numbers is not None else index + 1
        return f"{self.source}, row {number}"

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: Sequence[int]) -> Split:
        rows = [self.rows[i] for i in indices] if isinstance(self.rows, list) else self.rows.select(indices)
        lines = [self.lines[i] for i in indices] if self.lines is not None else None
        numbers = [self.numbers[i] if self.numbers is not None else i + 1 for i in indices]
        return Split(rows, self.source, lines, numbers)


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(".cache") / "data"


def load_splits(cfg: DataConfig, family: str) -> dict[str, Split]:
    """All splits of the configured source, keyed by lower-case split name."""
    if cfg.path == "synthetic":
        return _synthetic(cfg, family)
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        return _directory(path, cfg.encoding)
    if path.is_file():
        return _file(path, cfg.encoding)
    if path.suffix.lower() in FILE_SUFFIXES or cfg.path.startswith((".", "/", "~")):
        raise DataError(f"data file not found: {cfg.path} (resolved to {path.resolve()}). Check data.path.")
    return _hub(cfg)


def source_fingerprint(cfg: DataConfig) -> str:
    """Identifies the source's contents cheaply: path, size and modification time of every file read."""
    if cfg.path == "synthetic":
        from data.synthetic import TASK_VERSION

        return f"synthetic-v{TASK_VERSION}"
    h = hashlib.sha256(repr((cfg.path, cfg.subset)).encode())
    path = Path(cfg.path).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if p.exists():
            st = p.stat()
            h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _synthetic(cfg: DataConfig, family: str) -> dict[str, Split]:
    from data.synthetic import TASK_VERSION, write_synthetic

    n_test = max(50, cfg.synthetic_size // 10)
    out = cache_root(cfg) / "synthetic" / f"v{TASK_VERSION}_seed{cfg.seed}_n{cfg.synthetic_size}"
    if not (out / f"{family}_test.jsonl").exists():
        write_synthetic(out, seed=cfg.seed, n_train=cfg.synthetic_size, n_test=n_test)
    return {"train": _file(out / f"{family}_train.jsonl")["train"], "test": _file(out / f"{family}_test.jsonl")["train"]}


def _directory(path: Path, encoding: str = "utf-8") -> dict[str, Split]:
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.Dataset):
            return {"train": Split(loaded, str(path))}
        return {name.lower(): Split(ds, f"{path}[{name}]") for name, ds in loaded.items()}
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise DataError(
            f"{path}: directory has neither a `save_to_disk` dataset (dataset_dict.json or state.json) nor "
            f"data files ({', '.join(FILE_SUFFIXES)})."
        )
    splits: dict[str, Split] = {}
    for p in files:
        name = _split_name(p.stem) if len(files) > 1 else "train"
        if name in splits:
            raise DataError(f"{path}: two files for split {name!r}: {splits[name].source} and {p}.")
        file_splits = _file(p, encoding)
        splits[name] = file_splits.get("train", next(iter(file_splits.values())))
    return splits


def _split_name(stem: str) -> str:
    stem = stem.lower()
    for name in ("train", *EVAL_SPLIT_NAMES):
        if stem == name or stem.endswith(("_" + name, "-" + name, "." + name)):
            return name
    return stem


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The file decoded with `encoding`, without a leading byte-order mark (Excel writes one in "CSV UTF-8").

    Bytes that do not decode are a DataError naming the line, the column and the bytes, with the encoding
    charset_normalizer guesses for the file when it can."""
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except LookupError as e:
        raise DataError(f"data.encoding={encoding!r} is not a known text encoding; use a Python codec name such "
                        "as utf-8, cp1252 or latin-1.") from e
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - line_start + 1
        guess = _guess_encoding(data)
        hint = (f"It looks like {guess}: set data.encoding={guess}" if guess
                else "Re-save the file as UTF-8, or set data.encoding to its encoding")
        raise DataError(f"{path}, line {line}, column {column}: byte(s) {data[e.start:e.end]!r} are not valid "
                        f"{encoding} ({e.reason}). {hint}.") from None
    return text.removeprefix("\ufeff")


def _guess_encoding(data: bytes) -> str | None:
    try:
        from charset_normalizer import from_bytes
    except ImportError:
        return None
    best = from_bytes(data).best()
    return best.encoding if best is not None and best.encoding not in ("utf_8", "ascii") else None


def _file(path: Path, encoding: str = "utf-8") -> dict[str, Split]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows, lines = _read_json_lines(path, read_text(path, encoding))
        return {"train": Split(rows, str(path), lines)}
    if suffix == ".json":
        return _read_json(path, encoding)
    if suffix in (".csv", ".tsv"):
        with io.StringIO(read_text(path, encoding), newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows, lines = [], []
            try:
                for row in reader:
                    rows.append(dict(row))
                    lines.append(reader.line_num)
            except csv.Error as e:
                raise DataError(f"{path}, line {reader.line_num}: unparsable CSV ({e}).") from e
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty CSV file; expected a header row with column names.")
        return {"train": Split(rows, str(path), lines)}
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: unreadable Parquet file ({e}).") from e
        return {"train": Split(rows, str(path))}
    raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(FILE_SUFFIXES)}.")


def _read_json_lines(path: Path, text: str) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: unparsable JSON ({e.msg} at column {e.colno}).") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object per line, got {type(row).__name__}.")
        rows.append(row)
        lines.append(lineno)
    return rows, lines


def _read_json(path: Path, encoding: str = "utf-8") -> dict[str, Split]:
    text = read_text(path, encoding)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            rows, lines = _read_json_lines(path, text)
            return {"train": Split(rows, str(path), lines)}
        raise DataError(f"{path}, line {e.lineno}: unparsable JSON ({e.msg} at column {e.colno}).") from e
    expected = 'a list of rows, or an object of splits such as {"train": [...], "test": [...]}'
    if isinstance(data, list):
        return {"train": Split(_objects(path, data, "top level"), str(path))}
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        return {
            str(name).lower(): Split(_objects(path, rows, f"split {name!r}"), f"{path}[{name}]")
            for name, rows in data.items()
        }
    if isinstance(data, dict):
        raise DataError(f"{path}: top-level object has keys {sorted(data)}; expected {expected}.")
    raise DataError(f"{path}: top level is {type(data).__name__}; expected {expected}.")


def _objects(path: Path, rows: list, where: str) -> list[dict]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}, {where}, row {i + 1}: expected a JSON object, got {type(row).__name__}.")
    return rows


def _hub(cfg: DataConfig) -> dict[str, Split]:
    import datasets

    try:
        loaded = datasets.load_dataset(cfg.path, cfg.subset)
    except Exception as e:
        raise DataError(
            f"could not load {cfg.path!r}: it is not a local file or directory, and loading it as a Hugging Face "
            f"dataset (subset={cfg.subset!r}) failed: {type(e).__name__}: {e}"
        ) from e
    return {name.lower(): Split(ds, f"hub:{cfg.path}[{name}]") for name, ds in loaded.items()}


def select_splits(cfg: DataConfig, splits: dict[str, Split]) -> tuple[Split, Split | None]:
    """The train split and the eval split (named, found, or held out), then sampled for quick runs."""
    if cfg.split.lower() not in splits:
        raise DataError(f"{cfg.path}: no split {cfg.split!r}; available: {sorted(splits)}. Set data.split.")
    train = splits[cfg.split.lower()]
    eval_: Split | None = None
    if cfg.eval_split is not None:
        if cfg.eval_split.lower() not in splits:
            raise DataError(
                f"{cfg.path}: no split {cfg.eval_split!r}; available: {sorted(splits)}. Set data.eval_split."
            )
        eval_ = splits[cfg.eval_split.lower()]
    else:
        found = [n for n in EVAL_SPLIT_NAMES if n in splits and n != cfg.split.lower()]
        if found:
            eval_ = splits[found[0]]
        elif cfg.eval_fraction > 0:
            order = list(range(len(train)))
            random.Random(cfg.seed).shuffle(order)
            n_eval = max(1, round(cfg.eval_fraction * len(train))) if len(train) > 1 else 0
            if n_eval:
                eval_ = train.subset(sorted(order[:n_eval]))
                train = train.subset(sorted(order[n_eval:]))
    train = _sample(train, cfg, cfg.seed)
    if eval_ is not None:
        eval_ = _sample(eval_, cfg, cfg.seed + 1)
    return train, eval_


def _sample(split: Split, cfg: DataConfig, seed: int) -> Split:
    n = len(split)
    keep = n if cfg.sample_ratio >= 1.0 else max(1, round(cfg.sample_ratio * n))
    if cfg.max_samples is not None:
        keep = min(keep, cfg.max_samples)
    if keep >= n:
        return split
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return split.subset(sorted(order[:keep]))
