"""Render records into texts in streamed batches: row groups of the records Parquet file in,
JSON Lines out, through the exact incremental-prefix rendering of `sft_pipeline.templating`."""

from __future__ import annotations

import json
import logging

from jinja2 import TemplateError

from sft_pipeline.config import TemplateConfig
from sft_pipeline.templating import ChatTemplateError, Renderer

log = logging.getLogger(__name__)


def render_stream(records, tokenizer, cfg: TemplateConfig, name: str = "texts"):
    """Render a `RecordTable` (or DataFrame) row group by row group into a spooled JSON Lines
    file; returns its `JSONLines` handle. Errors name the record's file and row."""
    from sft_pipeline.streams import JSONLinesSpool, Progress, iter_record_frames

    renderer = Renderer(tokenizer, cfg)
    out = JSONLinesSpool(name)
    progress = Progress(f"render_conversations ({name})", len(records))
    columns = ["record_id", "source_file", "source_row", "messages", "text"]
    for frame in iter_record_frames(records):
        rows = []
        for rec in frame[columns].itertuples(index=False):
            try:
                row = renderer.row(json.loads(rec.messages), rec.text)
            except (ChatTemplateError, TemplateError, KeyError, TypeError, ValueError) as exc:
                raise ChatTemplateError(
                    f"{rec.source_file}, row {rec.source_row} (record {rec.record_id}): "
                    f"cannot render with {renderer.name}: {exc}"
                ) from exc
            rows.append({"record_id": rec.record_id, **row})
        out.write(rows)
        progress.update(len(rows))
    progress.finish()
    if renderer.system_merges:
        log.info(
            "%s does not support a system role: merged the system prompt into the first user "
            "turn of %d of %d records",
            renderer.name,
            renderer.system_merges,
            out.rows,
        )
    log.info("rendered %d records with %s", out.rows, renderer.name)
    return out.close()
