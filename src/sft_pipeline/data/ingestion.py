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
    dropped_keys,
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
    snapshot: hub.HubSnapshot | None = None  # a file of this Hub snapshot, pinned by its commit


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
            found.extend(Source(p, snapshot.shown(p), snapshot) for p in snapshot.files)
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


# --------------------------------------------------------------------------------------------
# Images named by path: where they live, as DVC tracks them
#
# An image that records name by path is an input of ingestion like the data file itself (its
# sha256 goes into the record), so its folder is a dep of `ingest_records`. `data.images` names
# those folders; `auto` finds them from the first `DETECT_ROWS` records of each local data file
# (reading a file whole at every `kedro dvc generate` and DVC stage start would cost as much as
# ingesting it), and ingestion stops on any image outside them: an image is never untracked.
#
#     data/01_raw/vqa.jsonl         {"images": ["img/cats/1.jpg"], ...}
#     data/01_raw/img/cats/1.jpg    -> dep data/01_raw/img   (the top folder below the file's)
#     data/01_raw/2.jpg             -> dep data/01_raw/2.jpg (beside the file: just the image)
#     /srv/pics/3.jpg               -> dep /srv/pics         (outside: its own folder)
#
# The data file's own folder is never a dep: it may hold the pipeline's outputs.

AUTO_IMAGES = "auto"


def _local_sources(cfg: DataConfig) -> list[Source]:
    """The local files and dataset folders of `data.path` that exist (missing ones are
    ingestion's error and DVC's missing dep)."""
    found: list[Source] = []
    for entry in as_list(cfg.path):
        if hub.is_hub_path(entry):
            continue
        expanded = os.path.expanduser(entry)
        paths = _expand(entry) if has_magic(expanded) else [Path(expanded)]
        found.extend(Source(p, _shown(p)) for p in paths if p.exists())
    return found


def _image_folder(source: Source) -> Path:
    """Relative image paths of a file are relative to its folder (a dataset folder: to itself)."""
    return source.path if source.path.is_dir() else source.path.parent


def _sampled_image_paths(source: Source, cfg: DataConfig) -> list[Path]:
    """Image files named by the first `DETECT_ROWS` records of one file (absolute)."""
    try:
        head = list(islice(iter_rows(source, DETECT_ROWS), DETECT_ROWS))
        if not head:
            return []
        schema, resolved = file_schema(source.shown, _union_columns(head), cfg)
    except InputFileError:
        return []  # ingestion reports the file
    folder = _image_folder(source)
    paths = []
    for _number, row in head:
        _fmt, messages, _text = to_canonical(row, schema, resolved, folder, digest_images=False)
        parts = images.image_parts(messages)
        paths.extend(Path(p["path"]).resolve() for p in parts if p.get("path"))
    return paths


def _image_dep(image: Path, folder: Path) -> Path:
    """The dep that tracks one image of a file in `folder` (the drawing above)."""
    try:
        inside = image.relative_to(folder)
    except ValueError:
        return image.parent
    return image if len(inside.parts) == 1 else folder / inside.parts[0]


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """Paths in first-found order, without those inside another one."""
    unique = list(dict.fromkeys(paths))
    return [p for p in unique if not any(q != p and q in p.parents for q in unique)]


def image_locations(cfg: DataConfig, sources: list[Source] | None = None) -> list[Path]:
    """The folders (or files) that hold the images records name by path, as DVC tracks them:
    `data.images` expanded, or found from the data (`auto`, the note above) of `sources`
    (default: `data.path`'s local files). Absolute."""
    if cfg.images != AUTO_IMAGES:
        found: list[Path] = []
        for entry in as_list(cfg.images):
            expanded = os.path.expanduser(entry)
            found.extend(_walk_glob(expanded) if has_magic(expanded) else [Path(expanded)])
        return _outermost(p.resolve() for p in found)
    deps = []
    for source in _local_sources(cfg) if sources is None else sources:
        folder = _image_folder(source).resolve()
        for image in _sampled_image_paths(source, cfg):
            dep = _image_dep(image, folder)
            if dep.exists():  # a missing image is validation's to report, not DVC's
                deps.append(dep)
    return _outermost(deps)


def local_image_files(cfg: DataConfig, root: Path) -> list[str]:
    """The image folders (or files) records name, as the project sees them from `root` (DVC
    deps of `ingest_records`, after the data files): `image_locations` from `root`."""
    with contextlib.chdir(root):
        return [images.shown_path(p) for p in image_locations(cfg)]


class _TrackedImages:
    """Where images may live: the image locations and the data files and folders themselves
    (an image inside a dataset folder changes that dep)."""

    def __init__(self, cfg: DataConfig) -> None:
        if cfg.images != AUTO_IMAGES:
            for entry in as_list(cfg.images):
                expanded = os.path.expanduser(entry)
                if not (_walk_glob(expanded) if has_magic(expanded) else Path(expanded).exists()):
                    raise InputFileError(
                        "data.images",
                        f"{entry!r} matches no file or folder",
                        expected="folders (or files, globs) that hold the records' images",
                        hint=f"Paths are relative to {Path.cwd()}",
                    )
        sources = _local_sources(cfg)
        locations = image_locations(cfg, sources)
        self.shown = [images.shown_path(p) for p in locations]
        self.roots = locations + [s.path.resolve() for s in sources]

    def check(self, source: Source, number: int, messages: Any) -> None:
        for part in images.image_parts(messages):
            if not part.get("path") or part.get("sha256") is None:
                continue  # embedded bytes, or a missing image validation quarantines
            path = Path(part["path"]).resolve()
            if not any(root == path or root in path.parents for root in self.roots):
                raise InputFileError(
                    source.shown,
                    f"image {part['path']} is outside the image folders DVC tracks "
                    f"({', '.join(self.shown) or 'none'}), so editing it would not re-run "
                    "ingest_records",
                    line=number,
                    field="images",
                    hint="Name the folders that hold the images in data.images (auto finds "
                    f"them from the first {DETECT_ROWS} records of each file), then run "
                    "`kedro dvc generate`",
                )


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
    source: Source,
    rows: list[Row],
    schema: str,
    resolved,
    tracked: _TrackedImages | None = None,
) -> list[dict[str, Any]]:
    shown, image_root = source.shown, _image_folder(source)
    if source.snapshot is not None:
        hub.fetch_record_images(source.snapshot, shown, rows, schema, resolved, image_root)
    out = []
    for number, row in rows:
        fmt, messages, text = to_canonical(row, schema, resolved, image_root)
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

    _check_columns_map(cfg)
    sources = resolve_sources(cfg)
    tracked = _TrackedImages(cfg)
    progress = Progress("ingest_records")
    total = 0
    for source in sources:
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
            records = _canonical(source, chunk, schema, resolved, tracked)
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
