"""Read instruction data files into canonical records (see `sft_pipeline.records`).

Only file-level problems stop ingestion, with an `InputFileError` naming the file, the line and
what was expected; every readable record is kept as found, including bad ones, so validation can
quarantine them with reasons and the counts reconcile.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable
from glob import glob
from pathlib import Path
from typing import Any

import pandas as pd

from sft_pipeline.config import ConfigError, DataConfig
from sft_pipeline.errors import InputFileError
from sft_pipeline.records import (
    content_id,
    detect_schema,
    dumps_messages,
    dumps_raw,
    expected_columns,
    make_frame,
    resolve_columns,
    schema_keys,
    to_canonical,
)

log = logging.getLogger(__name__)

_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
_SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}
_SUPPORTED = ".json (a list of objects), .jsonl, .csv, .parquet or a datasets.save_to_disk folder"
# Keys `data.columns` may use: our field names, plus the aliases records.py accepts.
_COLUMN_KEYS = (
    "prompt",
    "response",
    "completion",
    "instruction",
    "input",
    "output",
    "system",
    "messages",
    "conversations",
    "text",
)

Row = tuple[int, dict[str, Any]]


def _shown(path: Path) -> str:
    """The path as the user should see it: relative to the working directory when under it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("state.json", "dataset_dict.json")
    )


def resolve_paths(path: str | list[str]) -> list[Path]:
    """Expand `data.path` (a file, a folder, a glob or a list of them) in a deterministic order."""
    entries = [path] if isinstance(path, str) else list(path)
    if not entries:
        raise InputFileError("data.path", "is an empty list", expected=f"files: {_SUPPORTED}")
    found: list[Path] = []
    for entry in entries:
        expanded = os.path.expanduser(entry)
        if any(ch in expanded for ch in "*?["):
            matches = [
                Path(m)
                for m in sorted(glob(expanded, recursive=True))
                if Path(m).is_file() or _is_dataset_folder(Path(m))
            ]
            if not matches:
                raise InputFileError(
                    entry,
                    "the pattern matches no files",
                    expected=f"at least one file: {_SUPPORTED}",
                    hint=f"Paths are relative to {Path.cwd()}",
                )
            found.extend(matches)
        elif Path(expanded).exists():
            found.append(Path(expanded))
        else:
            raise InputFileError(
                entry,
                "no such file or folder",
                expected=f"an existing file: {_SUPPORTED}",
                hint=f"Paths are relative to {Path.cwd()}",
            )
    return found


def _read_bytes(path: Path, shown: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputFileError(shown, f"cannot be read: {exc.strerror or exc}") from None


def _decode(data: bytes, shown: str) -> str:
    """UTF-8 text of a file; bad bytes are reported with their line and byte offset."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputFileError(
            shown,
            f"is not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start}",
            line=data.count(b"\n", 0, exc.start) + 1,
            expected="UTF-8 text (re-save the file as UTF-8)",
        ) from None
    text = text.removeprefix("\ufeff")  # a BOM from Windows editors is not content
    if not text.strip():
        raise InputFileError(shown, "is empty", expected=f"records: {_SUPPORTED}")
    return text


def _read_jsonl(path: Path, shown: str) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(_decode(_read_bytes(path, shown), shown).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = None
            if number == 1 and line.lstrip().startswith("["):
                hint = "The file looks like a JSON list; name it .json"
            raise InputFileError(
                shown,
                f"invalid JSON: {exc.msg}",
                line=number,
                column=exc.colno,
                expected="one JSON object per line (JSON Lines)",
                hint=hint,
            ) from None
        if not isinstance(obj, dict):
            raise InputFileError(
                shown,
                f"the line holds a JSON {_json_type(obj)}",
                line=number,
                expected="one JSON object per line (JSON Lines)",
            )
        rows.append((number, obj))
    return rows


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _read_json(path: Path, shown: str) -> list[Row]:
    try:
        doc = json.loads(_decode(_read_bytes(path, shown), shown))
    except json.JSONDecodeError as exc:
        raise InputFileError(
            shown,
            f"invalid JSON: {exc.msg}",
            line=exc.lineno,
            column=exc.colno,
            expected="a JSON list of objects",
        ) from None
    if not isinstance(doc, list):
        raise InputFileError(
            shown,
            f"the document is a JSON {_json_type(doc)}",
            expected="a JSON list of objects ([{...}, {...}])",
            hint="For one object per line, name the file .jsonl",
        )
    for index, item in enumerate(doc):
        if not isinstance(item, dict):
            raise InputFileError(
                shown,
                f"item {index + 1} of the list is a JSON {_json_type(item)}",
                expected="every item to be a JSON object",
            )
    return [(index + 1, item) for index, item in enumerate(doc)]


def _read_csv(path: Path, shown: str) -> list[Row]:
    reader = csv.reader(io.StringIO(_decode(_read_bytes(path, shown), shown), newline=""))
    header: list[str] | None = None
    rows: list[Row] = []
    last_line = 0
    try:
        for fields in reader:
            start, last_line = last_line + 1, reader.line_num
            if not fields:
                continue
            if header is None:
                header = fields
                if len(set(header)) != len(header):
                    raise InputFileError(
                        shown, f"duplicate column names in header {header}", line=start
                    )
                continue
            if len(fields) > len(header):
                raise InputFileError(
                    shown,
                    f"the row has {len(fields)} fields but the header has {len(header)}",
                    line=start,
                    expected="one value per header column (quote values that contain commas)",
                )
            # A short row reads as missing values (None), which validation reports per record.
            padded = fields + [None] * (len(header) - len(fields))
            rows.append((start, dict(zip(header, padded, strict=True))))
    except csv.Error as exc:
        raise InputFileError(
            shown, f"invalid CSV: {exc}", line=reader.line_num, expected="RFC 4180 CSV"
        ) from None
    return rows


def _read_parquet(path: Path, shown: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except OSError as exc:
        raise InputFileError(shown, f"cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for corrupt files
        raise InputFileError(
            shown, f"cannot be read as Parquet: {exc}", expected="a Parquet file"
        ) from None
    return [(index + 1, row) for index, row in enumerate(table.to_pylist())]


def _read_dataset_folder(path: Path, shown: str) -> list[Row]:
    import datasets

    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise InputFileError(
            shown,
            f"is a DatasetDict with splits {splits}",
            expected="a single-split datasets.save_to_disk folder",
            hint=f"Point data.path at one split, e.g. {shown}/{splits[0] if splits else 'train'}",
        )
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise InputFileError(
            shown,
            f"cannot be loaded with datasets.load_from_disk: {exc}",
            expected="a datasets.save_to_disk folder",
        ) from None
    return [(index + 1, row) for index, row in enumerate(dataset.to_list())]


def read_rows(path: Path) -> tuple[str, list[Row]]:
    """(shown path, [(1-based line/row, original object)]) for one file or dataset folder."""
    shown = _shown(path)
    if path.is_dir():
        if not _is_dataset_folder(path):
            raise InputFileError(
                shown,
                "is a folder but not a datasets.save_to_disk folder (no state.json)",
                expected=_SUPPORTED,
                hint=f"To read the files inside, use a glob such as {shown}/*.jsonl",
            )
        rows = _read_dataset_folder(path, shown)
    else:
        kind = _SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise InputFileError(
                shown, f"unsupported file type {path.suffix or '(none)'!r}", expected=_SUPPORTED
            )
        reader = {
            "jsonl": _read_jsonl,
            "json": _read_json,
            "csv": _read_csv,
            "parquet": _read_parquet,
        }[kind]
        rows = reader(path, shown)
    if not rows:
        raise InputFileError(shown, "contains no records", expected=f"records: {_SUPPORTED}")
    return shown, rows


def _union_columns(rows: Iterable[Row]) -> list[str]:
    seen: dict[str, None] = {}
    for _number, row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def file_schema(shown: str, columns: list[str], cfg: DataConfig) -> tuple[str, dict[str, str]]:
    """(schema, our field -> column) for one file; a missing required column stops the run."""
    schema = cfg.schema_
    if schema == "auto":
        try:
            schema = detect_schema(columns, cfg.columns)
        except ValueError as exc:
            raise InputFileError(shown, str(exc)) from None
    absent = sorted(
        f"{key}: {name}"
        for key, name in cfg.columns.items()
        if key in schema_keys(schema) and name not in columns
    )
    if absent:
        # An explicit mapping to a column the file lacks is a typo, even for optional fields.
        raise InputFileError(
            shown,
            f"data.columns names column(s) the file does not have ({', '.join(absent)}); "
            f"columns found: {columns}",
            expected=f"columns {expected_columns(schema)} for data.schema={schema}",
        )
    resolved, missing = resolve_columns(schema, columns, cfg.columns)
    if missing:
        raise InputFileError(
            shown,
            f"missing required column(s) {missing} for data.schema={schema}; "
            f"columns found: {columns}",
            expected=f"columns {expected_columns(schema)}",
            hint="Map your column names with data.columns, e.g. "
            "{" + ", ".join(f"{name}: <your column>" for name in missing) + "}",
        )
    return schema, resolved


def _check_columns_map(cfg: DataConfig) -> None:
    unknown = sorted(set(cfg.columns) - set(_COLUMN_KEYS))
    if unknown:
        raise ConfigError(
            f"invalid parameters in `data`:\n  data.columns: unknown field(s) {unknown} "
            f"(allowed: {', '.join(_COLUMN_KEYS)}; each maps our field to your column name)"
        )


def ingest(cfg: DataConfig) -> pd.DataFrame:
    """Read every file of `cfg.path` into canonical records, in path and row order."""
    _check_columns_map(cfg)
    records: list[dict[str, Any]] = []
    for path in resolve_paths(cfg.path):
        shown, rows = read_rows(path)
        schema, resolved = file_schema(shown, _union_columns(rows), cfg)
        for number, row in rows:
            fmt, messages, text = to_canonical(row, schema, resolved)
            records.append(
                {
                    "record_id": content_id(messages, text),
                    "source_file": shown,
                    "source_row": number,
                    "format": fmt,
                    "messages": dumps_messages(messages),
                    "text": text,
                    "raw": dumps_raw(row),
                }
            )
        log.info("read %d records from %s (format %s)", len(rows), shown, schema)
    log.info("ingested %d records in total", len(records))
    return make_frame(records)
