"""Render records into texts in streamed batches: row groups of the records Parquet file in,
JSON Lines out, through the exact incremental-prefix rendering of `sft_pipeline.data.templating`.

Chat templates render in Python, one core each; with several cores and at least
`PARALLEL_MIN_GROUPS` row groups, forked workers render row groups side by side and the results
are written in input order, so the file is the same bytes as from one process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os

from jinja2 import TemplateError

from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.data.templating import ChatTemplateError, Renderer

log = logging.getLogger(__name__)

PARALLEL_MIN_GROUPS = 2
MAX_WORKERS = 4
_COLUMNS = ["record_id", "source_file", "source_row", "messages", "text"]
# The renderer forked workers inherit (set in the parent right before the fork).
_RENDERER: Renderer | None = None


def _render_group(columns: dict[str, list]) -> tuple[str, int, int]:
    """(JSON Lines of the rendered rows, rows, system merges) of one row group, rendered with
    the inherited renderer; serialized here, so a worker hands back one string."""
    from sft_pipeline.data.streams import json_line

    renderer = _RENDERER
    assert renderer is not None
    merges_before = renderer.system_merges
    rows = []
    for rid, source, row_number, messages, text in zip(
        *(columns[c] for c in _COLUMNS), strict=True
    ):
        try:
            row = renderer.row(json.loads(messages), text)
        except (ChatTemplateError, TemplateError, KeyError, TypeError, ValueError) as exc:
            raise ChatTemplateError(
                f"{source}, row {row_number} (record {rid}): cannot render with "
                f"{renderer.name}: {exc}"
            ) from exc
        rows.append(json_line({"record_id": rid, **row}))
    return "".join(rows), len(rows), renderer.system_merges - merges_before


def _workers(groups: int) -> int:
    """Worker processes for `groups` row groups: one per core (at most `MAX_WORKERS`), none
    for small data, on one core or where `SFT_PIPELINE_RENDER_WORKERS` says so (0: none)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    wanted = os.environ.get("SFT_PIPELINE_RENDER_WORKERS")
    limit = int(wanted) if wanted and wanted.isdigit() else min(cpus or 1, MAX_WORKERS)
    if groups < PARALLEL_MIN_GROUPS or limit < 2 or os.name != "posix":
        return 0
    return min(limit, groups)


def render_stream(records, tokenizer, cfg: TemplateConfig, name: str = "texts"):
    """Render a `RecordTable` (or DataFrame) row group by row group into a spooled JSON Lines
    file; returns its `JSONLines` handle. Errors name the record's file and row."""
    global _RENDERER
    from sft_pipeline.data.streams import (
        ROW_GROUP_ROWS,
        JSONLinesSpool,
        Progress,
        iter_record_frames,
    )

    renderer = Renderer(tokenizer, cfg)
    # Resolved once here (its warning logged once), not per worker; text records need no
    # template, and conversations report a missing one with their row.
    with contextlib.suppress(ChatTemplateError):
        _ = renderer.template
    out = JSONLinesSpool(name)
    progress = Progress(f"render_conversations ({name})", len(records))
    groups = ({c: frame[c].tolist() for c in _COLUMNS} for frame in iter_record_frames(records))
    workers = _workers(-(-len(records) // ROW_GROUP_ROWS))
    merges = 0
    _RENDERER = renderer
    try:
        if workers:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for block, n, merged in pool.imap(_render_group, groups):
                    out.write_lines(block, n)
                    merges += merged
                    progress.update(n)
        else:
            for columns in groups:
                block, n, merged = _render_group(columns)
                out.write_lines(block, n)
                merges += merged
                progress.update(n)
    finally:
        _RENDERER = None
    progress.finish()
    if merges:
        log.info(
            "%s does not support a system role: merged the system prompt into the first user "
            "turn of %d of %d records",
            renderer.name,
            merges,
            out.rows,
        )
    log.info(
        "rendered %d records with %s%s",
        out.rows,
        renderer.name,
        f" ({workers} processes)" if workers else "",
    )
    return out.close()
