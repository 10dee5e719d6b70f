"""Render records into texts in streamed batches: row groups of the records Parquet file in,
JSON Lines out, through the exact incremental-prefix rendering of `sft_pipeline.data.templating`.

Chat templates render in Python, one core each; with several cores and at least
`PARALLEL_MIN_GROUPS` row groups, forked workers render row groups side by side and the results
are written in input order, so the file is the same bytes as from one process.

Rendering never hangs a run: a record whose template runs longer than `RECORD_TIMEOUT_S`
(`SFT_PIPELINE_RENDER_TIMEOUT_S`) fails it naming the record, and a worker that dies (killed,
out of memory) fails it within a second naming the batch; the workers die with the run.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from jinja2 import TemplateError

from sft_pipeline.common import processes
from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.common.errors import UserError
from sft_pipeline.data.records import loads_tools
from sft_pipeline.data.templating import ChatTemplateError, Renderer
from sft_pipeline.data.turn_rows import record_rows

log = logging.getLogger(__name__)

PARALLEL_MIN_GROUPS = 2
MAX_WORKERS = 4
_COLUMNS = ["record_id", "source_file", "source_row", "messages", "tools", "text"]
# A bound on one record's rendering (a template is code: it may loop); seconds.
RECORD_TIMEOUT_S = 60.0
# The renderer forked workers inherit, and the roles whose turns train (`training.
# roles_to_train`): set in the parent right before the fork.
_RENDERER: Renderer | None = None
_ROLES: tuple[str, ...] = ("assistant",)


class RenderWorkerError(UserError, RuntimeError):
    """A render worker process ended (killed, out of memory) before returning its batch."""


class _RecordTimeout(Exception):
    pass


def _record_timeout() -> float:
    wanted = os.environ.get("SFT_PIPELINE_RENDER_TIMEOUT_S")
    try:
        return float(wanted) if wanted else RECORD_TIMEOUT_S
    except ValueError:
        return RECORD_TIMEOUT_S


@contextlib.contextmanager
def _alarm_raises():
    """While active, SIGALRM raises `_RecordTimeout` (main thread only; elsewhere no bound)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        yield False
        return

    def expired(signum, frame):
        raise _RecordTimeout

    previous = signal.signal(signal.SIGALRM, expired)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _render_group(columns: dict[str, list]) -> tuple[str, int, int, int]:
    """(JSON Lines of the rendered rows, rows, system merges, records) of one row group,
    rendered with the inherited renderer; serialized here, so a worker hands back one string.
    A record may render as several rows (one per trained turn, `sft_pipeline.data.turn_rows`),
    each carrying its record's id."""
    from sft_pipeline.data.streams import json_line

    renderer = _RENDERER
    assert renderer is not None
    merges_before = renderer.system_merges
    timeout = _record_timeout()
    rows = []
    # Rows of a mixture name their source, for evaluation per source (none for `data.path`).
    names = columns.get("source") or [""] * len(columns["record_id"])
    with _alarm_raises() as bounded:
        for rid, source, row_number, messages, tools, text, name in zip(
            *(columns[c] for c in _COLUMNS), names, strict=True
        ):
            try:
                if bounded:
                    signal.setitimer(signal.ITIMER_REAL, timeout)
                rendered = record_rows(
                    renderer, json.loads(messages), text, loads_tools(tools), _ROLES
                )
                if bounded:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _RecordTimeout:
                raise ChatTemplateError(
                    f"{source}, row {row_number} (record {rid}): rendering with {renderer.name} "
                    f"took more than {timeout:g} s (SFT_PIPELINE_RENDER_TIMEOUT_S); a template "
                    "that loops on this record?"
                ) from None
            except (ChatTemplateError, TemplateError, KeyError, TypeError, ValueError) as exc:
                raise ChatTemplateError(
                    f"{source}, row {row_number} (record {rid}): cannot render with "
                    f"{renderer.name}: {exc}"
                ) from exc
            extra = {"source": name} if name else {}
            rows.extend(json_line({"record_id": rid, **row, **extra}) for row in rendered)
    records = len(columns["record_id"])
    return "".join(rows), len(rows), renderer.system_merges - merges_before, records


def _batch(index: int, columns: dict[str, list]) -> str:
    """Batch `index` as a user finds it: its position and the records it starts and ends with."""
    sources, rows = columns["source_file"], columns["source_row"]
    if not rows:
        return f"batch {index + 1} (empty)"
    return (
        f"batch {index + 1} ({len(rows)} records: {sources[0]}, row {rows[0]} to "
        f"{sources[-1]}, row {rows[-1]})"
    )


def _in_workers(groups, workers: int):
    """(block, rows, merges) of each row group, in input order, from `workers` forked processes.

    At most two batches per worker are in flight, so memory stays bounded; a worker that dies
    fails the run with the batch it was waiting for, and the other workers are stopped.
    """
    parent = os.getpid()
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=processes.die_with_parent,
        initargs=(parent,),
    )
    pending: collections.deque = collections.deque()
    groups = enumerate(groups)
    done = False
    try:
        while True:
            while not done and len(pending) < 2 * workers:
                try:
                    index, columns = next(groups)
                except StopIteration:
                    done = True
                    break
                pending.append((index, columns, pool.submit(_render_group, columns)))
            if not pending:
                break
            index, columns, future = pending.popleft()
            try:
                yield future.result()
            except BrokenProcessPool:
                raise RenderWorkerError(
                    f"a render worker process ended (killed, or out of memory?) while "
                    f"{_batch(index, columns)} was being rendered; the run stops rather than "
                    "wait for it. Rerun; if it recurs, set SFT_PIPELINE_RENDER_WORKERS=0 to "
                    "render in one process"
                ) from None
    except BaseException:
        # Do not wait for workers that may never finish (a hung or dead one): stop them all.
        workers_left = list(getattr(pool, "_processes", {}).values())
        for process in workers_left:
            with contextlib.suppress(OSError, ValueError):
                process.kill()
        for process in workers_left:
            with contextlib.suppress(OSError, ValueError, AssertionError):
                process.join(timeout=5)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _workers(groups: int) -> int:
    """Worker processes for `groups` row groups: one per core (at most `MAX_WORKERS`), none
    for small data, on one core or where `SFT_PIPELINE_RENDER_WORKERS` says so (0: none)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    wanted = os.environ.get("SFT_PIPELINE_RENDER_WORKERS")
    limit = int(wanted) if wanted and wanted.isdigit() else min(cpus or 1, MAX_WORKERS)
    if groups < PARALLEL_MIN_GROUPS or limit < 2 or os.name != "posix":
        return 0
    return min(limit, groups)


def render_stream(
    records, tokenizer, cfg: TemplateConfig, name: str = "texts", roles=("assistant",)
):
    """Render a `RecordTable` (or DataFrame) row group by row group into a spooled JSON Lines
    file; returns its `JSONLines` handle. Errors name the record's file and row. `roles`: the
    roles whose turns train (`training.roles_to_train`)."""
    global _RENDERER, _ROLES
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
    wanted = [*_COLUMNS, "source"]
    groups = (
        {c: frame[c].tolist() for c in wanted if c in frame.columns}
        for frame in iter_record_frames(records)
    )
    workers = _workers(-(-len(records) // ROW_GROUP_ROWS))
    merges = 0
    _RENDERER, _ROLES = renderer, tuple(roles)
    try:
        if workers:
            results = _in_workers(groups, workers)
        else:
            results = (_render_group(columns) for columns in groups)
        for block, n, merged, records_done in results:
            out.write_lines(block, n)
            merges += merged
            progress.update(records_done)
    finally:
        _RENDERER, _ROLES = None, ("assistant",)
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
        "rendered %d records as %d rows with %s%s",
        progress.done,
        out.rows,
        renderer.name,
        f" ({workers} processes)" if workers else "",
    )
    return out.close()
