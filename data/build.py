"""`build_datasets`: source -> rows -> canonical records -> token columns, cached, with a report."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from data.config import DataConfig
from data.errors import DataError, row_error
from data.formats import FAMILIES, PAIR_NUMBERS, Drop, canonical, detect_format
from data.report import DataReport, SplitReport
from data.sources import Split, cache_root, load_splits, select_splits, source_fingerprint
from data.tokenize import Formatter, Tokenise, check_tokenizer

FORMAT_VERSION = 3  # bumped whenever tokenised rows or the report change, to invalidate caches
# the per-row number a family's records may carry: a preference pair's margin, an SFT row's weight
ROW_NUMBERS = {"preference": PAIR_NUMBERS, "sft": ("weight",)}
STAT_COLUMNS = ("_prompt_len", "_response_len", "_prompt_truncated", "_response_truncated", "_drop")
# config fields that do not change the tokenised rows
_NOT_IN_FINGERPRINT = ("num_proc", "packing", "share_prompt", "share_prompt_row_tokens", "group_by_length",
                       "cache_dir")


@dataclass
class DataBundle:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    report: DataReport


def build_datasets(
    family: str,
    cfg: DataConfig,
    tokenizer,
    *,
    report_dir: str | Path | None = None,
    log: Callable[[str], None] | None = print,
) -> DataBundle:
    """Tokenised train and eval datasets of one family ("sft", "preference" or "prompt").

    Results are cached under `cfg.cache_dir` (default .cache/data), keyed by the config, the source
    files (path, size, mtime) and the tokenizer. The report is passed to `log` (None: silent) and saved
    to `report_dir` when given.
    """
    if family not in FAMILIES:
        raise DataError(f"unknown data family {family!r}; expected one of {FAMILIES}.")
    # pad == EOS is checked where it matters, by make_collator (reward and PPO batches, not DPO ones)
    check_tokenizer(tokenizer, family, allow_pad_as_eos=True)
    fingerprint = data_fingerprint(family, cfg, tokenizer)
    cached = cache_root(cfg) / "tokenised" / f"{family}-{fingerprint}"
    with _quiet_progress():
        if (cached / "report.json").exists():
            bundle = _load(cached)
        else:
            bundle = _build(family, cfg, tokenizer, fingerprint)
            _save(bundle, cached)
    if log is not None:
        log(bundle.report.format())
    if report_dir is not None:
        bundle.report.save(report_dir)
    return bundle


@contextlib.contextmanager
def _quiet_progress():
    """No per-step progress bars from datasets: the report says what happened."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def data_fingerprint(family: str, cfg: DataConfig, tokenizer) -> str:
    """A key of what builds a family's tokenised rows: the config fields that shape them, the source files and
    the tokenizer (`rows_fingerprint` keys the built rows themselves)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, family, fields], sort_keys=True, default=str).encode())
    h.update(source_fingerprint(cfg).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:16]


def rows_fingerprint(dataset) -> str:
    """A hash of tokenised rows themselves (`data_fingerprint` keys what builds them): their token columns
    (`*input_ids`, `*labels`), row by row in order, so the same rows give the same key whichever pipeline built
    them (the `datasets` fingerprint turns random when a transform cannot be hashed, which would miss the cache
    on every run). The precomputed reference keys its cache by it."""
    digest = hashlib.sha256()
    if hasattr(dataset, "with_format"):
        import pyarrow.compute as pc

        columns = sorted(c for c in dataset.column_names if c.endswith(("input_ids", "labels")))
        digest.update(json.dumps([len(dataset), columns]).encode())
        for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=4096):
            for name in columns:
                values = table.column(name).combine_chunks()
                digest.update(pc.list_value_length(values).to_numpy(zero_copy_only=False).tobytes())
                digest.update(values.flatten().to_numpy(zero_copy_only=False).tobytes())
        return digest.hexdigest()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, default=_jsonable).encode())
    return digest.hexdigest()


def _jsonable(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.chat_template, tokenizer.special_tokens_map, tokenizer.bos_token_id)).encode())
    return h.hexdigest()[:16]


def _build(family: str, cfg: DataConfig, tokenizer, fingerprint: str) -> DataBundle:
    formatter = Formatter(cfg, tokenizer)
    train_raw, eval_raw = select_splits(cfg, load_splits(cfg, family))
    if len(train_raw) == 0:
        raise DataError(f"{train_raw.source}: no rows in split {cfg.split!r}.")
    fmt = detect_format(family, cfg.format, train_raw.rows[0], train_raw.source)
    report = DataReport(family, cfg.path, fmt, formatter.description, fingerprint)
    out = {}
    for name, split in (("train", train_raw), ("eval", eval_raw)):
        if split is None:
            out[name] = None
            continue
        records, dropped = _canonical_rows(family, fmt, split, formatter)
        out[name], report.splits[name] = _tokenise(family, records, dropped, len(split), formatter, cfg, split.source)
    return DataBundle(out["train"], out["eval"], report)


def _canonical_rows(family: str, fmt: str, split: Split, formatter: Formatter) -> tuple[list[dict], Counter]:
    records, dropped = [], Counter()
    numbers = ROW_NUMBERS.get(family, ())  # numbers some formats carry per row: each on every row or none
    has_field: dict[str, bool] = {}
    kinds: dict[str, tuple[str, str]] = {}
    for i, row in enumerate(split.rows):
        where = split.where(i)
        try:
            record = canonical(family, fmt, row, where)
        except Drop as reason:
            dropped[str(reason)] += 1
            continue
        _check_templated(record, row, where, formatter)
        for key in numbers:
            if has_field.setdefault(key, key in record) != (key in record):
                raise row_error(where, row, f"{key!r} is set on some rows and not on others",
                                f"{key!r} on every row or none")
        _check_kinds(record, kinds, row, where)
        records.append(record)
    return records, dropped


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def _check_kinds(record: dict, kinds: dict[str, tuple[str, str]], row, where: str) -> None:
    """One type per field across rows, as a table column needs; checked here so the error names the row."""
    for key, value in record.items():
        if value is None:
            continue
        kind = _kind(value)
        first = kinds.setdefault(key, (kind, where))
        if first[0] != kind:
            raise row_error(
                where, row, f"field {key!r} is {kind} here but {first[0]} in {first[1]}",
                f"one type for {key!r} in every row",
            )


def _check_templated(record: dict, row, where: str, formatter: Formatter) -> None:
    if "text" in record:
        bos = formatter.tokenizer.bos_token
        if bos and record["text"].lstrip().startswith(bos):
            raise row_error(
                where, row, f"the text starts with the BOS token {bos!r}", "text without special tokens",
                "BOS is added once by the tokeniser; remove it from the data.",
            )
        if formatter.response_template is not None and formatter.response_template not in record["text"]:
            raise row_error(
                where, row, f"response template {formatter.response_template!r} not found in the text "
                f"(it starts {record['text'][:60]!r})", "the marker that precedes the response in every text row",
                "Fix data.response_template (it must match the text exactly, spaces and newlines included), or "
                "set it to null to train on the whole text.",
            )
        return
    messages = record.get("messages") or record.get("prompt_messages") or []
    for i, m in enumerate(messages):
        if m["role"] not in formatter.roles:
            raise row_error(
                where, row, f"message {i} has role {m['role']!r}", f"roles {list(formatter.roles)} (tool only with a "
                "chat template that mentions tools)", "Rename the role, or drop the message: the template would "
                "render it as it likes, or not at all.",
            )
    if formatter.mode == "chat":
        try:
            formatter.render(messages, generation_prompt="prompt_messages" in record)
        except Exception as error:  # a template's raise_exception (jinja2 TemplateError) or a bug in the template
            raise row_error(
                where, row, f"the chat template refuses this conversation: {type(error).__name__}: {error}",
                "a conversation the template accepts (many require user and assistant turns to alternate, "
                "after an optional system message)", "Fix the row, or choose another template with data.template.",
            ) from None
    for m in messages:
        marker = formatter.check_text(m["content"])
        if marker is not None:
            raise row_error(
                where, row, f"a {m['role']} turn already contains template markup {marker!r}, so the template would "
                "be applied twice (double BOS, nested turns)", "plain text in prompts and responses",
                "Give untemplated text, or set data.template='raw' to use the prompt text exactly as it is.",
            )


def _tokenise(family, records, dropped, rows_read, formatter, cfg, source) -> tuple[datasets.Dataset, SplitReport]:
    if not records:
        raise DataError(f"{source}: every row was dropped ({dict(dropped)}); nothing to train on.")
    try:
        ds = datasets.Dataset.from_list(records)
    except Exception as e:
        raise DataError(
            f"{source}: rows have fields of different types across rows ({type(e).__name__}: {e}). Give each "
            "field one type (for example always a string)."
        ) from e
    remove = [c for c in ds.column_names if family != "prompt" or c == "prompt_messages"]
    num_proc = cfg.num_proc if cfg.num_proc > 1 and len(ds) >= 2 * cfg.num_proc else None
    ds = ds.map(Tokenise(family, formatter), remove_columns=remove, num_proc=num_proc)
    drops = ds["_drop"]
    for reason in drops:
        if reason:
            dropped[reason] += 1
    keep = [i for i, reason in enumerate(drops) if not reason]
    if not keep:
        raise DataError(
            f"{source}: every row was dropped ({dict(dropped)}). Raise data.max_length or lower data.max_prompt_length."
        )
    ds = ds.select(keep) if len(keep) < len(ds) else ds
    stats = {c: ds[c] for c in STAT_COLUMNS[:4]}
    report = SplitReport.from_stats(
        rows_read, dropped, stats["_prompt_len"], stats["_response_len"], stats["_prompt_truncated"],
        stats["_response_truncated"],
    )
    return ds.remove_columns(list(STAT_COLUMNS)), report


def _save(bundle: DataBundle, path: Path) -> None:
    """Write to a temporary directory, then rename: concurrent builders never see half a cache."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    bundle.train.save_to_disk(str(tmp / "train"))
    if bundle.eval is not None:
        bundle.eval.save_to_disk(str(tmp / "eval"))
    (tmp / "report.json").write_text(json.dumps(bundle.report.as_dict(), indent=2))
    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path) -> DataBundle:
    report = DataReport.from_dict(json.loads((path / "report.json").read_text()))
    report.cached = True
    train = datasets.load_from_disk(str(path / "train"))
    eval_ = datasets.load_from_disk(str(path / "eval")) if (path / "eval").exists() else None
    return DataBundle(train, eval_, report)
