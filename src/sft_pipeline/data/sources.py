"""Which files `data.path` (or each of `data.sources`) names: the one expansion of its entries,
for every caller.

An entry is a file, a `datasets.save_to_disk` folder, a glob (`data/*.jsonl`, `data/**/*.json`)
or a Hub dataset (`hf://datasets/<owner>/<name>`, `sft_pipeline.data.hub`); `~` is the user's
home. Ingestion reads the sources `resolve_sources` gives (a missing file or a pattern matching
nothing stops it), `kedro dvc generate` lists the local files `local_data_files` gives as the
deps of `ingest_records`, and the image folders DVC tracks are found from `local_sources`
(`sft_pipeline.data.image_deps`): the same expansion each time, so what DVC watches is what
ingestion reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from glob import has_magic
from pathlib import Path

from sft_pipeline.common.config import DataConfig, as_list
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.common.paths import glob_regex
from sft_pipeline.data import hub
from sft_pipeline.data.readers import SUPPORTED, is_dataset_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One file (or save_to_disk folder) to read, and its name in records and messages."""

    path: Path
    shown: str
    snapshot: hub.HubSnapshot | None = None  # a file of this Hub snapshot, pinned by its commit


def shown(path: Path) -> str:
    """The path as the user should see it: relative to the working directory when under it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def walk_glob(pattern: str) -> list[Path]:
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


def expand_paths(entry: str, *, readable_only: bool = True) -> list[Path]:
    """The local paths one entry names, `~` expanded: a glob's matches (with `readable_only`,
    only files and dataset folders), or the entry itself (whether it exists or not)."""
    expanded = os.path.expanduser(entry)
    if not has_magic(expanded):
        return [Path(expanded)]
    matches = walk_glob(expanded)
    if not readable_only:
        return matches
    return [m for m in matches if m.is_file() or is_dataset_folder(m)]


def _missing(entry: str, problem: str) -> InputFileError:
    what = "at least one file" if has_magic(os.path.expanduser(entry)) else "an existing file"
    return InputFileError(
        entry, problem, expected=f"{what}: {SUPPORTED}", hint=f"Paths are relative to {Path.cwd()}"
    )


def source_configs(cfg: DataConfig) -> list[tuple[str, DataConfig]]:
    """(name, the data section as that source alone) of each entry of `data.sources`;
    `data.path` alone is one source named "" (its records' `source` column stays empty)."""
    if not cfg.sources:
        return [("", cfg)]
    return [
        (
            source.label,
            cfg.model_copy(
                update={
                    "path": source.path,
                    "schema_": source.schema_,
                    "columns": source.columns,
                    "split": source.split,
                    "subset": source.subset,
                    "sources": [],
                }
            ),
        )
        for source in cfg.sources
    ]


def _entries(cfg: DataConfig) -> list[str]:
    return [entry for _, one in source_configs(cfg) for entry in as_list(one.path)]


def resolve_sources(cfg: DataConfig) -> list[Source]:
    """Expand `data.path` (files, folders, globs, Hub datasets) in a deterministic order; a file
    reached twice (a symlink, an overlapping glob) is read once, where it is first found."""
    entries = as_list(cfg.path)
    if not entries:
        raise InputFileError("data.path", "is an empty list", expected=f"files: {SUPPORTED}")
    found: list[Source] = []
    for entry in entries:
        if hub.is_hub_path(entry):
            snapshot = hub.resolve(entry, cfg.split, cfg.subset)
            found.extend(Source(p, snapshot.shown(p), snapshot) for p in snapshot.files)
            continue
        paths = expand_paths(entry)
        if not paths:
            raise _missing(entry, "the pattern matches no files")
        if not has_magic(os.path.expanduser(entry)) and not paths[0].exists():
            raise _missing(entry, "no such file or folder")
        found.extend(Source(p, shown(p)) for p in paths)
    unique: dict[str, Source] = {}
    for source in found:
        real = os.path.realpath(source.path)
        if real in unique:
            log.info("%s is %s again: read once", source.shown, unique[real].shown)
            continue
        unique[real] = source
    return list(unique.values())


def local_sources(cfg: DataConfig) -> list[Source]:
    """The local files and dataset folders of `data.path` that exist (missing ones are
    ingestion's error and DVC's missing dep); Hub entries name no local file."""
    return [
        Source(p, shown(p))
        for entry in _entries(cfg)
        if not hub.is_hub_path(entry)
        for p in expand_paths(entry)
        if p.exists()
    ]


def local_data_files(cfg: DataConfig, root: Path) -> list[str]:
    """The local files `data.path` names, as the project sees them from `root` (the DVC deps of
    `ingest_records`): globs expanded exactly as `resolve_sources` expands them, loops read once.

    A Hub dataset names no local file (its `@<commit>` in the parameter pins it); an entry that
    is no glob, or a glob that matches nothing, is returned as written, so DVC reports a
    missing dep.
    """
    found: list[str] = []
    with contextlib.chdir(root):
        for entry in _entries(cfg):
            if hub.is_hub_path(entry):
                continue
            globbed = has_magic(os.path.expanduser(entry))
            matches = expand_paths(entry) if globbed else []
            found.extend([m.as_posix() for m in matches] or [entry])
    return list(dict.fromkeys(found))
