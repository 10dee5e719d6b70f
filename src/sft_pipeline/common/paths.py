"""Paths that come from files or parameters stay where they belong.

A checkpoint's `model.safetensors.index.json` names the shard files the merge reads and
writes; those names are data (a downloaded or crafted checkpoint may hold anything), so each
must be a plain relative name that resolves inside the checkpoint folder: `../x`, `/etc/x` or a
symlink out of the folder is refused, naming the index file and the entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath


class UnsafePathError(ValueError):
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
