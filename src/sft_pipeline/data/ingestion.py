"""Read instruction data files into canonical records (see `sft_pipeline.data.records`).

Only file-level problems stop ingestion, with an `InputFileError` naming the file, the line and
what was expected; every readable record is kept as found, including bad ones, so validation can
quarantine them with reasons and the counts reconcile.

Files are streamed (`sft_pipeline.data.readers`) in chunks of `data.chunk_rows` records into the
records Parquet file, so memory does not grow with the file. A file's format is detected from the
columns of its first `DETECT_ROWS` records (a CSV's header, a Parquet schema), the same whatever
the chunk size, so chunked and whole-file ingestion write the same bytes. Which files are read is
`sft_pipeline.data.sources`' answer; which image folders may hold their images,
`sft_pipeline.data.image_deps`'.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from sft_pipeline.common.config import DataConfig
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.data import hub, image_deps, images, readers, schemas
from sft_pipeline.data.readers import Row
from sft_pipeline.data.records import (
    content_id,
    dropped_keys,
    dumps_messages,
    dumps_raw,
    row_tools,
    to_canonical,
)
from sft_pipeline.data.schemas import DETECT_ROWS
from sft_pipeline.data.sources import Source, resolve_sources, source_configs
from sft_pipeline.data.turns import split_inline_reasoning

log = logging.getLogger(__name__)


def _canonical(
    source: Source,
    rows: list[Row],
    schema: str,
    resolved,
    tracked: image_deps.TrackedImages | None = None,
    reasoning_tags: tuple[str, str] = DataConfig().reasoning_tags,
) -> list[dict[str, Any]]:
    shown, image_root = source.shown, image_deps.image_folder(source)
    if source.snapshot is not None:
        hub.fetch_record_images(source.snapshot, shown, rows, schema, resolved, image_root)
    out = []
    for number, row in rows:
        fmt, messages, text = to_canonical(row, schema, resolved, image_root)
        messages = split_inline_reasoning(messages, reasoning_tags)
        tools = row_tools(row, schema, resolved)
        with_images = bool(images.image_parts(messages))
        if with_images and tracked is not None and source.snapshot is None:
            tracked.check(source, number, messages)
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
                "dropped_keys": dropped_keys(row, schema, resolved),
            }
        )
    return out


def iter_record_chunks(cfg: DataConfig) -> Iterator[list[dict[str, Any]]]:
    """Canonical records of every file of `cfg.path`, in path and row order, in chunks of at
    most `cfg.chunk_rows` (never spanning two files)."""
    from sft_pipeline.data.streams import Progress

    progress = Progress("ingest_records")
    total = 0
    for name, one in source_configs(cfg):
        for records in _source_chunks(one, progress):
            for record in records:
                record["source"] = name
            total += len(records)
            yield records
        if name:
            log.info("source %s: %d records so far in total", name, total)
    progress.finish()
    log.info("ingested %d records in total", total)


def _source_chunks(cfg: DataConfig, progress) -> Iterator[list[dict[str, Any]]]:
    """The chunks of one source (`data.path` alone, or one entry of `data.sources`)."""
    sources = resolve_sources(cfg)
    tracked = image_deps.TrackedImages(cfg)
    for source in sources:
        rows = readers.iter_rows(source.path, source.shown, cfg.chunk_rows)
        head = list(islice(rows, DETECT_ROWS))
        if not head:
            raise InputFileError(
                source.shown, "contains no records", expected=f"records: {readers.SUPPORTED}"
            )
        schema, resolved = schemas.file_format(source.shown, readers.union_columns(head), cfg)
        count = 0
        pending: Iterator[Row] = iter(head)
        for chunk in _chunked(_chain(pending, rows), cfg.chunk_rows):
            records = _canonical(source, chunk, schema, resolved, tracked, cfg.reasoning_tags)
            count += len(records)
            progress.update(len(records))
            yield records
        log.info("read %d records from %s (format %s)", count, source.shown, schema)


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
