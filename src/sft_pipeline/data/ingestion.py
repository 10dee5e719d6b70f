"""Read instruction data files into canonical records (see `sft_pipeline.data.records`).

Only file-level problems stop ingestion, with an `InputFileError` naming the file, the line and
what was expected; every readable record is kept as found, including bad ones, so validation can
quarantine them with reasons and the counts reconcile.

Files are streamed (`sft_pipeline.data.readers`) in chunks of `data.chunk_rows` records into the
records Parquet file, so memory does not grow with the file. A file's format is detected from the
columns of its first `DETECT_ROWS` records (a CSV's header, a Parquet schema), the same whatever
the chunk size, so chunked and whole-file ingestion write the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from glob import has_magic
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd

from sft_pipeline.common.config import ConfigError, DataConfig, as_list
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.common.paths import glob_regex
from sft_pipeline.data import hub, images, readers
from sft_pipeline.data.records import (
    content_id,
    detect_schema,
    dumps_messages,
    dumps_raw,
    expected_columns,
    make_frame,
    resolve_columns,
    row_tools,
    schema_keys,
    to_canonical,
)

log = logging.getLogger(__name__)

_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
_SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}
_SUPPORTED = readers.SUPPORTED
# Records whose columns decide a JSON file's format (CSV and Parquet files declare theirs).
DETECT_ROWS = 1000
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
    "tools",
    "images",
)

Row = readers.Row


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


@dataclass(frozen=True)
class Source:
    """One file (or save_to_disk folder) to read, and its name in records and messages."""

    path: Path
    shown: str


def _walk_glob(pattern: str) -> list[Path]:
    """Expand a glob pattern by walking each real folder once: a symlink loop under any pattern
    (`data/*/**`, `data/*/*/*.jsonl`) is entered once, never until the path is too long, and a
    folder is searched only as deep as the pattern reaches (any depth with `**`)."""
    components = pattern.split("/")
    fixed = 0
    while fixed < len(components) - 1 and not has_magic(components[fixed]):
        fixed += 1
    base = "/".join(components[:fixed]) or ("/" if pattern.startswith("/") else ".")
    rest = "/".join(components[fixed:])
    regex = glob_regex(rest)
    # Without `**`, a match has exactly as many components as the pattern.
    depth_limit = None if "**" in rest else len(components) - fixed
    found: list[Path] = []
    seen: set[str] = set()
    for folder, dirs, files in os.walk(base, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # as glob: no hidden folders
        rel = os.path.relpath(folder, base)
        depth = 0 if rel == "." else rel.count("/") + 1
        for name in [*dirs, *(f for f in files if not f.startswith("."))]:
            relpath = name if rel == "." else f"{rel}/{name}"
            if regex.match(relpath):
                found.append(Path(folder) / name)
        if depth_limit is not None and depth + 1 >= depth_limit:
            dirs[:] = []
    # The order glob gives (by path string), or by path parts for `**` (as before).
    return sorted(found) if "**" in rest else sorted(found, key=str)


def _expand(entry: str) -> list[Path]:
    candidates = _walk_glob(os.path.expanduser(entry))
    return [m for m in candidates if m.is_file() or _is_dataset_folder(m)]


def resolve_sources(cfg: DataConfig) -> list[Source]:
    """Expand `data.path` (files, folders, globs, Hub datasets) in a deterministic order; a file
    reached twice (a symlink, an overlapping glob) is read once, where it is first found."""
    entries = as_list(cfg.path)
    if not entries:
        raise InputFileError("data.path", "is an empty list", expected=f"files: {_SUPPORTED}")
    found: list[Source] = []
    for entry in entries:
        if hub.is_hub_path(entry):
            snapshot = hub.resolve(entry, cfg.split, cfg.subset)
            found.extend(Source(p, snapshot.shown(p)) for p in snapshot.files)
            continue
        expanded = os.path.expanduser(entry)
        if has_magic(expanded):
            matches = _expand(entry)
            if not matches:
                raise InputFileError(
                    entry,
                    "the pattern matches no files",
                    expected=f"at least one file: {_SUPPORTED}",
                    hint=f"Paths are relative to {Path.cwd()}",
                )
            found.extend(Source(m, _shown(m)) for m in matches)
        elif Path(expanded).exists():
            found.append(Source(Path(expanded), _shown(Path(expanded))))
        else:
            raise InputFileError(
                entry,
                "no such file or folder",
                expected=f"an existing file: {_SUPPORTED}",
                hint=f"Paths are relative to {Path.cwd()}",
            )
    unique: dict[str, Source] = {}
    for source in found:
        real = os.path.realpath(source.path)
        if real in unique:
            log.info("%s is %s again: read once", source.shown, unique[real].shown)
            continue
        unique[real] = source
    return list(unique.values())


def local_data_files(cfg: DataConfig, root: Path) -> list[str]:
    """The local files `data.path` names, as the project sees them from `root` (the DVC deps of
    `ingest_records`): globs expanded exactly as `resolve_sources` expands them, loops read once.

    A Hub dataset names no local file (its `@<commit>` in the parameter pins it); an entry that
    matches nothing is returned as written, so DVC reports the missing dep.
    """
    entries = as_list(cfg.path)
    found: list[str] = []
    with contextlib.chdir(root):
        for entry in entries:
            if hub.is_hub_path(entry):
                continue
            matches = _expand(entry) if has_magic(os.path.expanduser(entry)) else []
            found.extend([m.as_posix() for m in matches] or [entry])
    return list(dict.fromkeys(found))


def iter_rows(source: Source, batch_rows: int = 10_000) -> Iterator[Row]:
    """(1-based line/row, original object) of one file or dataset folder, streamed."""
    path, shown = source.path, source.shown
    if path.is_dir():
        if not _is_dataset_folder(path):
            raise InputFileError(
                shown,
                "is a folder but not a datasets.save_to_disk folder (no state.json)",
                expected=_SUPPORTED,
                hint=f"To read the files inside, use a glob such as {shown}/*.jsonl",
            )
        return readers.read_dataset_folder(path, shown, batch_rows)
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InputFileError(
            shown, f"unsupported file type {path.suffix or '(none)'!r}", expected=_SUPPORTED
        )
    if kind == "parquet":
        return readers.read_parquet(path, shown, batch_rows)
    return {"jsonl": readers.read_jsonl, "json": readers.read_json, "csv": readers.read_csv}[kind](
        path, shown
    )


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


def _canonical(
    shown: str, rows: Iterable[Row], schema: str, resolved, image_root: Path | None = None
) -> list[dict[str, Any]]:
    out = []
    for number, row in rows:
        fmt, messages, text = to_canonical(row, schema, resolved, image_root)
        tools = row_tools(row, schema, resolved)
        with_images = bool(images.image_parts(messages))
        out.append(
            {
                # Images count by their bytes, never by where they were found.
                "record_id": content_id(images.identity_view(messages), text, tools),
                "source_file": shown,
                "source_row": number,
                "format": fmt,
                "messages": dumps_messages(messages),
                "tools": tools,
                "text": text,
                "raw": dumps_raw(images.raw_safe(row) if with_images else row),
            }
        )
    return out


def iter_record_chunks(cfg: DataConfig) -> Iterator[list[dict[str, Any]]]:
    """Canonical records of every file of `cfg.path`, in path and row order, in chunks of at
    most `cfg.chunk_rows` (never spanning two files)."""
    from sft_pipeline.data.streams import Progress

    _check_columns_map(cfg)
    progress = Progress("ingest_records")
    total = 0
    for source in resolve_sources(cfg):
        rows = iter_rows(source, cfg.chunk_rows)
        head = list(islice(rows, DETECT_ROWS))
        if not head:
            raise InputFileError(
                source.shown, "contains no records", expected=f"records: {_SUPPORTED}"
            )
        schema, resolved = file_schema(source.shown, _union_columns(head), cfg)
        count = 0
        pending: Iterator[Row] = iter(head)
        for chunk in _chunked(_chain(pending, rows), cfg.chunk_rows):
            # Image paths in a file are relative to its folder (a dataset folder: to itself).
            root = source.path if source.path.is_dir() else source.path.parent
            records = _canonical(source.shown, chunk, schema, resolved, root)
            count += len(records)
            progress.update(len(records))
            yield records
        total += count
        log.info("read %d records from %s (format %s)", count, source.shown, schema)
    progress.finish()
    log.info("ingested %d records in total", total)


def _chain(*iterables: Iterable[Row]) -> Iterator[Row]:
    for iterable in iterables:
        yield from iterable


def _chunked(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    it = iter(rows)
    while chunk := list(islice(it, size)):
        yield chunk


def ingest_to_parquet(cfg: DataConfig):
    """Stream every record into a spooled records Parquet file; returns its `RecordTable`."""
    from sft_pipeline.data.streams import ParquetSpool

    spool = ParquetSpool("records")
    for records in iter_record_chunks(cfg):
        spool.write(records)
    return spool.close()


def ingest(cfg: DataConfig) -> pd.DataFrame:
    """Read every file of `cfg.path` into canonical records, in path and row order (in memory:
    for small data and tests; the pipeline streams with `ingest_to_parquet`)."""
    records: list[dict[str, Any]] = []
    for chunk in iter_record_chunks(cfg):
        records.extend(chunk)
    return make_frame(records)
