"""Hugging Face Hub datasets as `data.path: hf://datasets/<owner>/<name>[@<revision>]`.

The repository is resolved with `huggingface_hub.snapshot_download` to a local snapshot (online,
or from the local cache with `HF_HUB_OFFLINE=1`), and the split's files are then read by our
own readers, like any local file. Online, the repository's file list is read first and only the
files of the requested split (and subset) are downloaded. The usual Hub layouts are recognised,
first match wins:

    <subset>/<split>-*.parquet|jsonl|...   data/<subset>/<split>-*   (a dataset with configs)
    data/<split>-*                          data/<split>/*            <split>-*   <split>.*
    *_<split>.jsonl, <split>_*.parquet, ... (the split's name as a word of the file's name)
    *.parquet|jsonl|json|csv                (`train` only: the files whose names name no split)

Splits are never guessed into training: a file whose name carries a split word (`test`,
`validation`, `dev`, `eval`, ...; `SPLIT_WORDS`) is only ever read as that split. With no file
of the requested split, `train` reads only the files that name no split, and a repository whose
files all name other splits is refused, naming them and `data.split`.

Records may name images by path (relative to their data file, as for local files): the images
the records of each chunk name are downloaded from the same commit (or found in the local cache
offline), and a path that leads outside the repository stops ingestion.

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
from typing import Any

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
# The words that make a file name name a split, by split (the Hub's usual spellings); a file
# named with any of them belongs to that split and no other.
SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class HubSnapshot:
    repo_id: str
    revision: str  # as asked for (a branch, tag or commit)
    commit: str  # the commit it resolved to
    folder: Path
    files: tuple[Path, ...]  # the split's files, sorted
    cache_dir: str | None = None

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


def _split_words(split: str) -> set[str]:
    """The words that name `split` in a file name (`dev` names `validation`, ...)."""
    for words in SPLIT_WORDS.values():
        if split.lower() in words:
            return set(words)
    return {split.lower()}


def named_splits(name: str) -> set[str]:
    """The splits a file's path names by its words (`data/eval_set.jsonl` -> {"test"}); words
    inside other words do not count (`contest.jsonl` names none)."""
    stem = name.lower().rsplit(".", 1)[0]
    words = set(_WORD.findall(stem))
    return {split for split, spellings in SPLIT_WORDS.items() if words & set(spellings)}


def _level(data: list[str]) -> list[str]:
    """The data files a repository keeps at its top, else those directly in `data/`."""
    return [n for n in data if "/" not in n] or [
        n for n in data if n.startswith("data/") and n.count("/") == 1
    ]


def select_split(names: list[str], split: str, subset: str | None) -> list[str]:
    """The files of `split` (in `subset`) among a repository's file names ('/'-separated,
    relative), by the usual layouts (see the module docstring); `*` stays within a folder."""
    data = sorted(n for n in names if n.lower().endswith(_SUFFIXES))
    for pattern in _patterns(split, subset):
        regex = glob_regex(pattern)
        found = [n for n in data if regex.match(n)]
        if found:
            return found
    if subset:
        return []
    level = _level(data)
    wanted = _split_words(split)
    named = [n for n in level if wanted & set(_WORD.findall(n.lower().rsplit(".", 1)[0]))]
    if named:
        return named
    if split == "train":
        # A repository with one unnamed split is its train split; files naming another split
        # (test.jsonl beside data.jsonl) never are.
        return [n for n in level if not named_splits(n)]
    return []


def _no_split_problem(names: list[str], split: str, subset: str | None) -> str:
    """Why `names` hold no file of `split`, naming what they hold instead."""
    data = sorted(n for n in names if n.lower().endswith(_SUFFIXES))
    where = f" of subset {subset!r}" if subset else ""
    others = sorted({s for n in _level(data) for s in named_splits(n)})
    if not subset and others:
        shown = [n for n in _level(data) if named_splits(n)][:20]
        return (
            f"has no files for split {split!r}{where} (data.split): its data files {shown} name "
            f"other splits ({', '.join(others)}), which are never read as {split!r}"
        )
    return f"has no files for split {split!r}{where} (data.split; files: {sorted(names)[:20]})"


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
            listing = _listing(repo_id, revision)
            wanted = select_split(listing, split, subset)
            if not wanted:
                raise _no_split(entry, listing, split, subset)
            allow = [glob.escape(name) for name in wanted]
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
    except InputFileError:
        raise
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
        layout = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        raise _no_split(entry, layout, split, subset)
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
    names = [p.relative_to(folder).as_posix() for p in files]
    log.info(
        "Hub dataset %s@%s: split %s%s, %d file(s): %s",
        repo_id,
        commit,
        split,
        f" of {subset}" if subset else "",
        len(files),
        ", ".join(names[:10]) + (", ..." if len(names) > 10 else ""),
    )
    return HubSnapshot(repo_id, revision or "main", commit, folder, tuple(files), _cache_dir())


def _no_split(entry: str, names: list[str], split: str, subset: str | None) -> InputFileError:
    return InputFileError(
        entry,
        _no_split_problem(names, split, subset),
        expected="data/<split>-*.parquet, <subset>/<split>-*, <split>.jsonl or similar",
        hint="Set data.split (and data.subset for a dataset with configs)",
    )


def fetch_record_images(
    snapshot: HubSnapshot,
    shown: str,
    rows: list[tuple[int, dict[str, Any]]],
    schema: str,
    columns: dict[str, str],
    root: Path,
) -> None:
    """`fetch_images` for the images that `rows` (`(line, row)`, read with `schema` and
    `columns`, image paths relative to `root`) name by path; no image file is read."""
    from sft_pipeline.data.images import image_parts
    from sft_pipeline.data.records import to_canonical

    named = []
    for line, row in rows:
        _fmt, messages, _text = to_canonical(row, schema, columns, root, digest_images=False)
        named.extend((line, part["path"]) for part in image_parts(messages) if part.get("path"))
    if named:
        fetch_images(snapshot, shown, named)


def fetch_images(snapshot: HubSnapshot, shown: str, named: list[tuple[int, str]]) -> None:
    """Make every image the records of one chunk name by path (`(line, path)`, as image parts
    name them) a file of the snapshot: those the split's download left out are downloaded from
    the same commit, or found in the local cache offline. A path that leads outside the
    repository, or an image missing from the cache offline, stops ingestion naming the line; an
    image the repository lacks is left missing, for validation to quarantine (`image_missing`)."""
    storage = os.path.realpath(snapshot.folder.parent.parent)
    folder = os.path.realpath(snapshot.folder)
    missing: dict[str, int] = {}
    for line, path in named:
        full = os.path.abspath(path)
        inside = os.path.relpath(full, folder)
        if os.path.exists(full):
            # A snapshot's files link into the repository's blobs.
            outside = not os.path.realpath(full).startswith(storage + os.sep)
        else:
            outside = inside == ".." or inside.startswith(".." + os.sep)
        if outside:
            raise InputFileError(
                shown,
                f"image {path} is not a file of the Hub repository {snapshot.repo_id}: a Hub "
                "dataset's images are read from its own repository only",
                line=line,
                field="images",
                expected="image paths relative to the data file, inside the repository",
            )
        if not os.path.exists(full):
            missing.setdefault(Path(inside).as_posix(), line)
    if not missing:
        return
    _download(snapshot, shown, sorted(missing))
    absent = [name for name in missing if not (snapshot.folder / name).is_file()]
    if absent and _offline():
        raise InputFileError(
            shown,
            f"image {absent[0]} of {snapshot.repo_id}@{snapshot.commit} is not in the local "
            f"Hugging Face cache and HF_HUB_OFFLINE is set ({len(absent)} image(s) missing)",
            line=missing[absent[0]],
            field="images",
            expected="the dataset's images downloaded once online, or HF_HUB_OFFLINE unset",
            hint="Cache them with: huggingface-cli download --repo-type dataset "
            f"{snapshot.repo_id} --revision {snapshot.commit} {' '.join(absent[:3])} ...",
        )


def _download(snapshot: HubSnapshot, shown: str, names: list[str]) -> None:
    """Download `names` of the snapshot's commit into its folder (offline: nothing to do but
    look in the cache, which the caller does)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if _offline():
        return
    try:
        snapshot_download(
            snapshot.repo_id,
            repo_type="dataset",
            revision=snapshot.commit,
            cache_dir=snapshot.cache_dir,
            allow_patterns=[glob.escape(name) for name in names],
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise InputFileError(
            shown,
            f"the images its records name cannot be downloaded from {snapshot.repo_id}@"
            f"{snapshot.commit} ({exc})",
            field="images",
        ) from None
