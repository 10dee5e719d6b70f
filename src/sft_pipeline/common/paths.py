"""Paths that come from files or parameters stay where they belong.

A checkpoint's `model.safetensors.index.json` names the shard files the merge reads and
writes; those names are data (a downloaded or crafted checkpoint may hold anything), so each
must be a plain relative name that resolves inside the checkpoint folder: `../x`, `/etc/x` or a
symlink out of the folder is refused, naming the index file and the entry. Hub ids and revisions
become paths in the Hugging Face cache (`refs/<revision>` is read offline), so they are checked
to be names before they get there.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path, PurePosixPath

from sft_pipeline.common.errors import UserError


class UnsafePathError(UserError, ValueError):
    """A path read from a file or a parameter would leave the folder it must stay in."""


def inside(folder: Path, name: object, *, source: str, what: str) -> Path:
    """`folder / name`, or `UnsafePathError` unless `name` stays inside `folder`.

    `source` names where the name was read (a file, a parameter key), `what` what it is.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise UnsafePathError(f"{source}: {what} {name!r} is not a file name")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts:
        raise UnsafePathError(
            f"{source}: {what} {name!r} leaves {folder}; expected a file name inside that folder"
        )
    path = folder / name
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        raise UnsafePathError(
            f"{source}: {what} {name!r} resolves to {real}, outside {folder} (a symlink?)"
        )
    return path


def read_shard_index(index: Path) -> dict[str, str]:
    """Tensor name -> shard file name of a `*.safetensors.index.json`, every shard checked to be
    a `.safetensors` file inside the index's folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnsafePathError(f"{index}: unreadable shard index ({exc!r})") from None
    if not isinstance(weight_map, dict):
        raise UnsafePathError(f"{index}: `weight_map` is not an object of tensor -> shard file")
    for tensor, shard in weight_map.items():
        inside(index.parent, shard, source=f"{index} (tensor {tensor!r})", what="shard file")
        if not shard.endswith(".safetensors"):
            raise UnsafePathError(
                f"{index} (tensor {tensor!r}): shard file {shard!r} is not a .safetensors file"
            )
    return weight_map


# A git ref or commit as the Hub takes it: `main`, `v1.0`, `refs/pr/3`, a 40-hex commit. Names
# reach the cache as paths (`refs/<revision>` is read offline), so `..`, a leading `/` and empty
# components are refused.
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9][A-Za-z0-9._+-]*)*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def check_hub_id(repo_id: str, *, key: str, owner_required: bool = True) -> str:
    """`repo_id` if it is a Hub id (`owner/name`) the Hub itself would accept, else ValueError
    naming the parameter `key`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UnsafePathError(f"{key}: {repo_id!r} is not a Hub id ({exc})") from None
    if owner_required and repo_id.count("/") != 1:
        raise UnsafePathError(f"{key}: {repo_id!r} is not a Hub id; expected <owner>/<name>")
    return repo_id


def check_hub_revision(revision: str | None, *, key: str) -> str | None:
    """`revision` if it is a branch, tag or commit name that stays a name, else ValueError."""
    if revision is None:
        return None
    if not isinstance(revision, str) or not _REVISION.match(revision) or ".." in revision:
        raise UnsafePathError(
            f"{key}: revision {revision!r} is not a branch, tag or commit name; expected e.g. "
            "main, v1.0, refs/pr/1 or a 40-character commit hash"
        )
    return revision


def check_snapshot(folder: Path, *, key: str) -> str:
    """The commit of a Hub snapshot folder (`.../snapshots/<commit>`), checked to be one."""
    if not _COMMIT.match(folder.name) or folder.parent.name != "snapshots":
        raise UnsafePathError(f"{key}: the Hub cache returned {folder}, not a snapshot folder")
    return folder.name


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob pattern as a regex over '/'-joined paths; `**/` matches any number of folders."""
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        else:
            j = i
            while j < len(pattern) and not pattern.startswith("**", j):
                j += 1
            parts.append(fnmatch.translate(pattern[i:j])[4:-3].replace(".*", "[^/]*"))
            i = j
    return re.compile("".join(parts) + r"\Z", re.DOTALL)
