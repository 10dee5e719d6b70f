"""Hugging Face Hub datasets as `data.path: hf://datasets/<owner>/<name>[@<revision>]`.

The repository is resolved with `huggingface_hub.snapshot_download` to a local snapshot (online,
or from the local cache with `HF_HUB_OFFLINE=1`), and the split's files are then read by our
own readers, like any local file. The usual Hub layouts are recognised, first match wins:

    <subset>/<split>-*.parquet|jsonl|...   data/<subset>/<split>-*   (a dataset with configs)
    data/<split>-*                          data/<split>/*            <split>-*   <split>.*
    *.parquet|jsonl|json|csv                (a repository holding a single split)

Every record's `source_file` names the repository, the resolved commit and the file
(`hf://datasets/tatsu-lab/alpaca@<commit>/data/train-00000-of-00001.parquet`), so the records
say exactly which upstream bytes they came from.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sft_pipeline.common.errors import InputFileError

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
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InputFileError(
            entry,
            "is not a Hub dataset path",
            expected="hf://datasets/<owner>/<name> or hf://datasets/<owner>/<name>@<revision>",
        )
    return repo_id, revision or None


def _cache_dir() -> str | None:
    # Read at call time (huggingface_hub reads its environment once, at import).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def split_files(folder: Path, split: str, subset: str | None) -> list[Path]:
    """The files of `split` (in `subset`) in a snapshot folder, by the usual layouts."""

    def data(paths) -> list[Path]:
        return sorted(p for p in paths if p.is_file() and p.name.lower().endswith(_SUFFIXES))

    patterns = []
    if subset:
        patterns += [f"{subset}/{split}-*", f"{subset}/{split}.*", f"{subset}/{split}/*"]
        patterns += [f"data/{subset}/{split}-*", f"data/{subset}/{split}/*"]
    patterns += [f"data/{split}-*", f"data/{split}.*", f"data/{split}/*", f"{split}-*"]
    patterns += [f"{split}.*", f"{split}/*"]
    for pattern in patterns:
        found = data(folder.glob(pattern))
        if found:
            return found
    if not subset:
        top = data(folder.glob("*")) or data(folder.glob("data/*"))
        if top and split == "train":
            return top  # a repository with one unnamed split is its train split
    return []


def resolve(entry: str, split: str, subset: str | None) -> HubSnapshot:
    """Download (or find in the cache) the snapshot of a Hub dataset and its split's files."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = parse(entry)
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                repo_type="dataset",
                revision=revision,
                cache_dir=_cache_dir(),
                local_files_only=_offline(),
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
    commit = folder.name
    files = split_files(folder, split, subset)
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
