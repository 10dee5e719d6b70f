"""Bounded-memory data flow between the data-half nodes: spooled files and lazy handles.

A node streams its output chunk by chunk into a spool file (a temporary folder of its own) and
returns a lazy handle to it; the Kedro dataset then moves that file into place atomically. The
next node loads a lazy handle on the artifact itself (memory-mapped Parquet, a JSON Lines file
read line by line). No stage holds more than a chunk of records, whatever the record count:

    ingest --chunks--> [records.parquet] --row groups--> validate --> [valid_records.parquet]
         --row groups--> split --> [train/eval_records.parquet] --row groups--> render
         --> [*_texts.jsonl] --line batches--> tokenize --> [*_tokens Arrow]

Parquet files are written in row groups of exactly `ROW_GROUP_ROWS` rows whatever the chunks
that produced them, so the bytes depend only on the records, never on a chunk size.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 4096
# Arrays of any shape in Arrow columns (a processor's pixel values) are stored flat, with their
# shape in a sibling column named with this suffix: `pixel_values` + `pixel_values_shape`.
SHAPE_SUFFIX = "_shape"
RECORD_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("format", pa.string()),
        ("messages", pa.string()),
        ("tools", pa.string()),
        ("text", pa.string()),
        ("raw", pa.string()),
        ("dropped_keys", pa.string()),
        # The `data.sources` entry a record came from ("" for `data.path` alone).
        ("source", pa.string()),
    ]
)


def spool_dir(prefix: str) -> Path:
    """A fresh temporary folder, removed when the process ends (whatever moved out of it)."""
    path = Path(tempfile.mkdtemp(prefix=f"sft-{prefix}-"))
    atexit.register(shutil.rmtree, str(path), ignore_errors=True)
    return path


def move_into(source: Path, target: Path) -> None:
    """Move a spooled file to `target` (a temporary sibling of the artifact); a spool folder
    left empty is removed at once, not only when the process ends."""
    try:
        os.replace(source, target)
    except OSError:  # another filesystem: copy, then drop the spool copy
        shutil.copyfile(source, target)
        source.unlink()
    for folder in (source.parent, source.parent.parent):
        if folder.name.startswith("sft-") or folder.parent.name.startswith("sft-"):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


class Progress:
    """Periodic progress lines with records/s: at most one every `every_s` seconds."""

    def __init__(self, what: str, total: int | None = None, every_s: float = 10.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s: %s", self.what, self._line(now))

    def _line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        of = f" of {self.total:,} ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.done:,} records{of}, {rate:,.0f} records/s"

    def finish(self) -> None:
        log.info("%s: done, %s", self.what, self._line(time.monotonic()))


class RecordTable:
    """A lazy handle on a Parquet file of records: read in row groups, never whole."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __len__(self) -> int:
        return pq.ParquetFile(self.path).metadata.num_rows

    @property
    def columns(self) -> list[str]:
        return list(pq.ParquetFile(self.path).schema_arrow.names)

    def iter_batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """One batch per row group (bounded: `ROW_GROUP_ROWS` rows when written here)."""
        # Buffered reads, not a memory map: mapped pages would count as memory.
        parquet = pq.ParquetFile(self.path)
        for index in range(parquet.num_row_groups):
            yield from parquet.read_row_group(index, columns=columns).to_batches()

    def iter_frames(self, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        for batch in self.iter_batches(columns):
            yield batch.to_pandas()

    def to_pandas(self) -> pd.DataFrame:
        return pq.read_table(self.path).to_pandas()

    def persist(self, target: Path) -> None:
        move_into(self.path, target)
        self.path = target


class ParquetSpool:
    """Writes records in fixed-size row groups to a spool file; `close` gives a RecordTable."""

    def __init__(self, name: str, schema: pa.Schema = RECORD_SCHEMA) -> None:
        self.schema = schema
        self.path = spool_dir(name) / f"{name}.parquet"
        self._writer = pq.ParquetWriter(self.path, schema)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, data: pa.Table | pa.RecordBatch | pd.DataFrame | list[dict[str, Any]]) -> None:
        table = _as_table(data, self.schema)
        if not table.num_rows:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            merged = pa.concat_tables(self._pending).combine_chunks()
            full = merged.num_rows - merged.num_rows % ROW_GROUP_ROWS
            for start in range(0, full, ROW_GROUP_ROWS):
                self._writer.write_table(merged.slice(start, ROW_GROUP_ROWS))
            rest = merged.slice(full)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> RecordTable:
        if self._pending_rows:
            self._writer.write_table(pa.concat_tables(self._pending).combine_chunks())
        self._pending = []
        self._writer.close()
        return RecordTable(self.path)


def _as_table(data: Any, schema: pa.Schema) -> pa.Table:
    if isinstance(data, pa.Table):
        return data.select(schema.names).cast(schema)
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data]).select(schema.names).cast(schema)
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data[schema.names], schema=schema, preserve_index=False)
    return pa.Table.from_pylist(list(data), schema=schema)


def write_records(data: Any, target: Path) -> None:
    """A DataFrame, table or RecordTable as a records Parquet file at `target`."""
    if isinstance(data, RecordTable):
        data.persist(target)
        return
    if isinstance(data, pd.DataFrame) and list(data.columns) != RECORD_SCHEMA.names:
        data.to_parquet(target, index=False)  # not canonical records: kept as pandas writes it
        return
    spool = ParquetSpool(target.stem)
    spool.write(data)
    spool.close().persist(target)


def iter_record_frames(records: Any) -> Iterator[pd.DataFrame]:
    """Chunks of records from a RecordTable, a DataFrame or a pyarrow table. Records written
    before a column existed (`tools`, `dropped_keys`) get it empty."""
    if isinstance(records, RecordTable):
        frames = records.iter_frames()
    elif isinstance(records, pa.Table):
        frames = (batch.to_pandas() for batch in records.to_batches(ROW_GROUP_ROWS))
    else:
        frames = (
            records.iloc[start : start + ROW_GROUP_ROWS].reset_index(drop=True)
            for start in range(0, max(len(records), 1), ROW_GROUP_ROWS)
        )
    for frame in frames:
        absent = {c: "" for c in ("tools", "dropped_keys") if c not in frame.columns}
        yield frame.assign(**absent) if absent else frame


def json_line(row: Any) -> str:
    """One JSON Lines line: UTF-8 as is (no escapes), then a newline."""
    return json.dumps(row, ensure_ascii=False) + "\n"


class JSONLines:
    """A lazy JSON Lines file: iterate rows, `len` counts lines; nothing is held in memory."""

    def __init__(self, path: str | os.PathLike, rows: int | None = None) -> None:
        self.path = Path(path)
        self._rows = rows

    def __len__(self) -> int:
        if self._rows is None:
            with self.path.open("rb") as f:
                self._rows = sum(1 for line in f if line.strip())
        return self._rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with self.path.open(encoding="utf-8", newline="\n") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def iter_batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        for row in self:
            batch.append(row)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch

    def persist(self, target: Path) -> None:
        move_into(self.path, target)
        self.path = target


class JSONLinesSpool:
    """Appends rows to a spool JSON Lines file; `close` gives a JSONLines handle."""

    def __init__(self, name: str) -> None:
        self.path = spool_dir(name) / f"{name}.jsonl"
        self._file = self.path.open("w", encoding="utf-8", newline="\n")
        self.rows = 0

    def write(self, rows: Iterable[Any]) -> None:
        for row in rows:
            self._file.write(json_line(row))
            self.rows += 1

    def write_lines(self, block: str, rows: int) -> None:
        """Append `rows` lines already serialized with `json_line`."""
        self._file.write(block)
        self.rows += rows

    def close(self) -> JSONLines:
        self._file.close()
        return JSONLines(self.path, self.rows)


def write_json_lines(data: Any, target: Path) -> None:
    """A JSONLines handle, a DataFrame or any iterable of rows as JSON Lines at `target`."""
    if isinstance(data, JSONLines):
        data.persist(target)
        return
    rows = data.to_dict(orient="records") if isinstance(data, pd.DataFrame) else data
    with target.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json_line(row))
