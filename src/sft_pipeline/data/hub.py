"""Hugging Face Hub datasets as `data.path: hf://datasets/<owner>/<name>[@<revision>]`.

The repository is resolved with `huggingface_hub.snapshot_download` to a local snapshot (online,
or from the local cache with `HF_HUB_OFFLINE=1`), and the split's files are then read by our
own readers, like any local file. Online, the repository's file list is read first and only the
files of the requested split (and subset) are downloaded. The usual Hub layouts are recognised,
first match wins:

    <subset>/<split>-*.parquet|jsonl|...   data/<subset>/<split>-*   (a dataset with configs)
    data/<split>-*                          data/<split>/*            <split>-*   <split>.*
    *.parquet|jsonl|json|csv                (a repository holding a single split)

Every record's `source_file` names the repository, the resolved commit and the file
(`hf://datasets/tatsu-lab/alpaca@<commit>/data/train-00000-of-00001.parquet`), so the records
say exactly which upstream bytes they came from. The repository id, the revision, `data.split`
and `data.subset` are checked to be names before they reach the cache as paths, and every file
read is checked to lie inside the repository's cache folder.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sft_pipeline.common.errors import InputFileError
from sft_pipeline.common.paths import (
    UnsafePathError,
    check_hub_id,
    check_hub_revision,
    check_snapshot,
    glob_regex,
)

log = logging.getLogger(__name__)

PREFIX = "hf://datasets/"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json", ".csv")


@dataclass(frozen=True)
class HubSnapshot:
    repo_id: str
    revision: str  # as asked for (a branch, tag or commit)
    commit: str  # the commit it resolved to
    folder: Path
    files: tuple[Path, ...]  # the split's files, sorted

    def shown(self, path: Path) -> str:
        return f"{PREFIX}{self.repo_id}@{self.commit}/{path.relative_to(self.folder).as_posix()}"


def is_hub_path(entry: str) -> bool:
    return entry.startswith(PREFIX)


def parse(entry: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of `hf://datasets/<owner>/<name>[@<revision>]`."""
    spec = entry[len(PREFIX) :].strip("/")
    repo_id, _, revision = spec.partition("@")
    expected = "hf://datasets/<owner>/<name> or hf://datasets/<owner>/<name>@<revision>"
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InputFileError(entry, "is not a Hub dataset path", expected=expected)
    try:
        check_hub_id(repo_id, key="data.path")
        check_hub_revision(revision or None, key="data.path")
    except UnsafePathError as exc:
        raise InputFileError(entry, str(exc), expected=expected) from None
    return repo_id, revision or None


_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def _check_name(key: str, value: str) -> None:
    # Split and subset names become glob patterns over the snapshot: plain names only.
    if not _NAME.match(value) or ".." in value:
        raise InputFileError(
            key, f"{value!r} is not a split or subset name", expected="letters, digits, - _ ."
        )


def _cache_dir() -> str | None:
    # Read at call time (huggingface_hub reads its environment once, at import).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _patterns(split: str, subset: str | None) -> list[str]:
    patterns = []
    if subset:
        patterns += [f"{subset}/{split}-*", f"{subset}/{split}.*", f"{subset}/{split}/*"]
        patterns += [f"data/{subset}/{split}-*", f"data/{subset}/{split}/*"]
    patterns += [f"data/{split}-*", f"data/{split}.*", f"data/{split}/*", f"{split}-*"]
    patterns += [f"{split}.*", f"{split}/*"]
    return patterns


def select_split(names: list[str], split: str, subset: str | None) -> list[str]:
    """The files of `split` (in `subset`) among a repository's file names ('/'-separated,
    relative), by the usual layouts (see the module docstring); `*` stays within a folder."""
    data = sorted(n for n in names if n.lower().endswith(_SUFFIXES))
    for pattern in _patterns(split, subset):
        regex = glob_regex(pattern)
        found = [n for n in data if regex.match(n)]
        if found:
            return found
    if not subset and split == "train":
        # A repository with one unnamed split is its train split.
        top = [n for n in data if "/" not in n] or [
            n for n in data if n.startswith("data/") and n.count("/") == 1
        ]
        return top
    return []


def split_files(folder: Path, split: str, subset: str | None) -> list[Path]:
    """The files of `split` (in `subset`) in a snapshot folder, by the usual layouts."""
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return [folder / name for name in select_split(names, split, subset)]


def _listing(repo_id: str, revision: str | None) -> list[str]:
    """The repository's file names at `revision` (one API call, no download)."""
    from huggingface_hub import HfApi

    return list(HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision))


def resolve(entry: str, split: str, subset: str | None) -> HubSnapshot:
    """Download (or find in the cache) the snapshot of a Hub dataset and its split's files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = parse(entry)
    _check_name("data.split", split)
    if subset:
        _check_name("data.subset", subset)
    try:
        allow = None
        if not _offline():
            # Only the requested split's files: a repository may hold many splits and subsets.
            wanted = select_split(_listing(repo_id, revision), split, subset)
            allow = [glob.escape(name) for name in wanted] or None
        folder = Path(
            snapshot_download(
                repo_id,
                repo_type="dataset",
                revision=revision,
                cache_dir=_cache_dir(),
                local_files_only=_offline(),
                allow_patterns=allow,
            )
        )
    except LocalEntryNotFoundError:
        raise InputFileError(
            entry,
            "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            if _offline()
            else "cannot be downloaded (no connection?) and is not in the local cache",
            expected="a dataset downloaded once online, or HF_HUB_OFFLINE unset",
            hint=f"Cache it with: huggingface-cli download --repo-type dataset {repo_id}",
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InputFileError(entry, f"cannot be resolved on the Hub: {exc}") from None
    try:
        commit = check_snapshot(folder, key="data.path")
    except UnsafePathError as exc:
        raise InputFileError(entry, str(exc)) from None
    files = split_files(folder, split, subset)
    # Snapshot files link into the repository's blobs; nothing may lead outside its cache folder.
    storage = os.path.realpath(folder.parent.parent)
    for path in files:
        if not os.path.realpath(path).startswith(storage + os.sep):
            raise InputFileError(entry, f"{path} leads outside the Hub cache folder {storage}")
    if not files:
        layout = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())[
            :20
        ]
        raise InputFileError(
            entry,
            f"has no files for split {split!r}"
            + (f" of subset {subset!r}" if subset else "")
            + f" (files: {layout})",
            expected="data/<split>-*.parquet, <subset>/<split>-*, <split>.jsonl or similar",
            hint="Set data.split (and data.subset for a dataset with configs)",
        )
    if not (revision and _COMMIT.match(revision)):
        log.warning(
            "%s is not pinned to a commit: it resolved to %s today, but DVC cannot see upstream "
            "changes to it. Pin it for reproducible runs: data.path: %s%s@%s",
            entry,
            commit,
            PREFIX,
            repo_id,
            commit,
        )
    log.info(
        "Hub dataset %s@%s: split %s%s, %d file(s)",
        repo_id,
        commit,
        split,
        f" of {subset}" if subset else "",
        len(files),
    )
    return HubSnapshot(repo_id, revision or "main", commit, folder, tuple(files))
