"""Streaming readers: each yields `(1-based line/row, original object)` from one file, in order.

No reader holds a whole file: JSON Lines and CSV are read line by line from the bytes, Parquet by
row group, a JSON list item by item with an incremental parser, a `save_to_disk` folder in
memory-mapped batches. Files are taken as people have them: a byte-order mark, Windows line
endings and blank lines are read with nothing lost, and lines are split on "\\n" only, so JSON
strings may hold raw U+2028, U+2029 or U+0085 (which `str.splitlines` would cut). Problems stop
with an `InputFileError` naming the file, the line and what was expected, within seconds: a line
or a list item over `MAX_RECORD_BYTES`, JSON nested deeper than the parser allows, bytes that
are not UTF-8 (with their line and byte offset). Only regular files are opened, checked
before any read (`sft_pipeline.data.file_checks`): a FIFO or a device never blocks a run.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sft_pipeline.common.errors import InputFileError
from sft_pipeline.data import file_checks

Row = tuple[int, dict[str, Any]]

# One record (a JSON Lines line, a CSV line, a JSON list item) larger than this is refused
# rather than read: no instruction record is that long, and reading it would hold it all.
MAX_RECORD_BYTES = 64 * 2**20
_BLOCK = 2**20
_BOM = b"\xef\xbb\xbf"
# The JSON type a document starting with this character has (for "the document is a JSON ...").
_KINDS = {"{": "object", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}
SUPPORTED = ".json (a list of objects), .jsonl, .csv, .parquet or a datasets.save_to_disk folder"
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
_SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}


def json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _open(path: Path, shown: str) -> BinaryIO:
    """The file opened for reading when it is a regular file (never a FIFO, a device, ...)
    within `file_checks.MAX_DATA_FILE_BYTES`; checked before anything is read."""
    try:
        return file_checks.open_regular(
            path, file_checks.MAX_DATA_FILE_BYTES, "MAX_DATA_FILE_BYTES"
        )
    except file_checks.UnreadableFile as exc:
        raise InputFileError(shown, exc.problem) from None


def _too_long(shown: str, line: int, what: str) -> InputFileError:
    return InputFileError(
        shown,
        f"{what} is longer than {MAX_RECORD_BYTES // 2**20} MiB",
        line=line,
        expected="records of at most that size (is this really a text dataset?)",
    )


def _lines(path: Path, shown: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line with its ending) for every line, split on b"\\n"."""
    with _open(path, shown) as f:
        offset, number = 0, 0
        while True:
            raw = f.readline(MAX_RECORD_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_RECORD_BYTES:
                raise _too_long(shown, number, "the line")
            start = 0
            if number == 1 and raw.startswith(_BOM):  # a BOM from Windows editors is no content
                start = len(_BOM)
            try:
                text = raw[start:].decode("utf-8")
            except UnicodeDecodeError as exc:
                at = offset + start + exc.start
                raise InputFileError(
                    shown,
                    f"is not valid UTF-8: byte 0x{raw[start + exc.start]:02x} at byte offset {at}",
                    line=number,
                    expected="UTF-8 text (re-save the file as UTF-8)",
                ) from None
            offset += len(raw)
            yield number, text


def _empty(shown: str) -> InputFileError:
    return InputFileError(shown, "is empty", expected=f"records: {SUPPORTED}")


def read_jsonl(path: Path, shown: str) -> Iterator[Row]:
    blank = True
    for number, line in _lines(path, shown):
        if not line.strip():
            continue
        blank = False
        try:
            obj = json.loads(line)
        except RecursionError:
            raise InputFileError(
                shown, "the JSON is nested too deeply to read", line=number
            ) from None
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
                f"the line holds a JSON {json_type(obj)}",
                line=number,
                expected="one JSON object per line (JSON Lines)",
            )
        yield number, obj
    if blank:
        raise _empty(shown)


class _JSONListParser:
    """Items of a top-level JSON list, decoded one at a time from blocks of the file."""

    _WS = " \t\n\r"

    def __init__(self, f: BinaryIO, shown: str) -> None:
        self.f, self.shown = f, shown
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.json = json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False
        self.read_bytes, self.lines_before, self.col_before = 0, 0, 0

    def _more(self) -> bool:
        if self.eof:
            return False
        block = self.f.read(_BLOCK)
        pending = len(self.decoder.getstate()[0])
        try:
            text = self.decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            at = self.read_bytes - pending + exc.start
            line = self.lines_before + self.buf.count("\n") + 1
            raise InputFileError(
                self.shown,
                f"is not valid UTF-8: byte 0x{exc.object[exc.start]:02x} at byte offset {at}",
                line=line,
                expected="UTF-8 text (re-save the file as UTF-8)",
            ) from None
        if self.read_bytes == 0:
            text = text.removeprefix("\ufeff")
        self.read_bytes += len(block)
        self.eof = not block
        # Drop what was consumed, keeping line/column bookkeeping for error messages.
        done = self.buf[: self.pos]
        newlines = done.count("\n")
        if newlines:
            self.lines_before += newlines
            self.col_before = len(done) - done.rfind("\n") - 1
        else:
            self.col_before += len(done)
        self.buf, self.pos = self.buf[self.pos :] + text, 0
        return True

    def _skip_ws(self) -> str:
        """The next non-whitespace character ('' at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in self._WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def _error(self, exc: json.JSONDecodeError, expected: str) -> InputFileError:
        line = self.lines_before + exc.lineno
        column = exc.colno + (self.col_before if exc.lineno == 1 else 0)
        return InputFileError(
            self.shown, f"invalid JSON: {exc.msg}", line=line, column=column, expected=expected
        )

    def _decode_item(self) -> Any:
        while True:
            try:
                value, end = self.json.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise InputFileError(self.shown, "the JSON is nested too deeply to read") from None
            except json.JSONDecodeError as exc:
                if len(self.buf) - self.pos > MAX_RECORD_BYTES:
                    raise _too_long(self.shown, self.lines_before + 1, "a list item") from None
                if self._more():
                    continue  # the item may run past the block read so far
                raise self._error(exc, "a JSON list of objects") from None
            if end - self.pos > MAX_RECORD_BYTES:
                line = self.lines_before + self.buf.count("\n", 0, self.pos) + 1
                raise _too_long(self.shown, line, "a list item")
            self.pos = end
            return value

    def items(self) -> Iterator[Any]:
        first = self._skip_ws()
        if not first:
            raise _empty(self.shown)
        if first != "[":
            kind = _KINDS.get(first, "number" if first in "-0123456789" else None)
            if kind is None:
                try:
                    self.json.raw_decode(self.buf, self.pos)
                except json.JSONDecodeError as exc:
                    raise self._error(exc, "a JSON list of objects") from None
            raise InputFileError(
                self.shown,
                f"the document is a JSON {kind}",
                expected="a JSON list of objects ([{...}, {...}])",
                hint="For one object per line, name the file .jsonl",
            )
        self.pos += 1
        expect_item = True
        while True:
            char = self._skip_ws()
            if char == "]":
                self.pos += 1
                break
            if not char:
                raise self._error(
                    json.JSONDecodeError("Expecting ']'", self.buf, len(self.buf)),
                    "a JSON list of objects",
                )
            if not expect_item:
                if char != ",":
                    raise self._error(
                        json.JSONDecodeError("Expecting ',' delimiter", self.buf, self.pos),
                        "a JSON list of objects",
                    )
                self.pos += 1
                self._skip_ws()
            yield self._decode_item()
            expect_item = False
        if self._skip_ws():
            raise self._error(
                json.JSONDecodeError("Extra data", self.buf, self.pos), "a JSON list of objects"
            )


def read_json(path: Path, shown: str) -> Iterator[Row]:
    with _open(path, shown) as f:
        for index, item in enumerate(_JSONListParser(f, shown).items()):
            if not isinstance(item, dict):
                raise InputFileError(
                    shown,
                    f"item {index + 1} of the list is a JSON {json_type(item)}",
                    expected="every item to be a JSON object",
                )
            yield index + 1, item


def read_csv(path: Path, shown: str) -> Iterator[Row]:
    # The csv module refuses fields over 128 KiB by default, which would stop the whole file
    # at one long answer; a record is allowed up to MAX_RECORD_BYTES, so a field is too (the
    # limit counts characters, never fewer than bytes). The limit is process-wide.
    if csv.field_size_limit() < MAX_RECORD_BYTES:
        csv.field_size_limit(MAX_RECORD_BYTES)
    last_line = 0
    reader = csv.reader(line for _number, line in _lines(path, shown))
    header: list[str] | None = None
    seen_text = False
    try:
        for fields in reader:
            start, last_line = last_line + 1, reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip() and header is None):
                continue
            seen_text = True
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
            yield start, dict(zip(header, padded, strict=True))
    except csv.Error as exc:
        raise InputFileError(
            shown, f"invalid CSV: {exc}", line=reader.line_num, expected="RFC 4180 CSV"
        ) from None
    if not seen_text:
        raise _empty(shown)


def read_parquet(path: Path, shown: str, batch_rows: int) -> Iterator[Row]:
    import pyarrow.parquet as pq

    with _open(path, shown) as f:
        try:
            parquet = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends for corrupt files
            raise InputFileError(
                shown, f"cannot be read as Parquet: {exc}", expected="a Parquet file"
            ) from None
        number = 0
        for batch in parquet.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                number += 1
                yield number, row


def read_dataset_folder(path: Path, shown: str, batch_rows: int) -> Iterator[Row]:
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
    number = 0
    for batch in dataset.data.table.to_batches(batch_rows):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def is_dataset_folder(path: Path) -> bool:
    """A `datasets.save_to_disk` folder (what `read_dataset_folder` reads)."""
    return path.is_dir() and any(
        (path / name).is_file() for name in ("state.json", "dataset_dict.json")
    )


def iter_rows(path: Path, shown: str, batch_rows: int = 10_000) -> Iterator[Row]:
    """(1-based line/row, original object) of one file or dataset folder, streamed by the
    reader its suffix names."""
    if path.is_dir():
        if not is_dataset_folder(path):
            raise InputFileError(
                shown,
                "is a folder but not a datasets.save_to_disk folder (no state.json)",
                expected=SUPPORTED,
                hint=f"To read the files inside, use a glob such as {shown}/*.jsonl",
            )
        return read_dataset_folder(path, shown, batch_rows)
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InputFileError(
            shown, f"unsupported file type {path.suffix or '(none)'!r}", expected=SUPPORTED
        )
    if kind == "parquet":
        return read_parquet(path, shown, batch_rows)
    return {"jsonl": read_jsonl, "json": read_json, "csv": read_csv}[kind](path, shown)


def union_columns(rows: Iterable[Row]) -> list[str]:
    """The keys of `rows`, in first-seen order (a file's columns, from its first records)."""
    seen: dict[str, None] = {}
    for _number, row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)
