"""Atomic writes: an interrupted run never leaves a half-written artifact that looks complete.

Everything is written to a temporary sibling and renamed into place; a rename within one
directory is atomic on POSIX, so readers see either the old artifact or the new one. The
temporary names carry this project's tag (`.<name>.sft-pipeline-tmp-*`, and
`.<name>.sft-pipeline-old-*` for a replaced folder), so the cleanup after a killed run removes
only what this project wrote.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
TMP_TAG = ".sft-pipeline-tmp-"
OLD_TAG = ".sft-pipeline-old-"
# What other tools' interrupted writes typically look like: warned about, never removed.
_LOOKALIKES = (".*.tmp-*", ".*.old-*")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success, rename it over `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}{TMP_TAG}"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir:
            # A directory cannot be renamed over a non-empty one: move the old one aside first,
            # so the window without a complete artifact is two renames long.
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_TAG}", dir=target.parent))
                os.replace(target, old / target.name)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Remove what interrupted atomic writes of this project left in `directory`; return what
    was removed. Temporary-looking files without this project's tag are left, with a warning.

    A process killed inside `atomic_path` leaves its temporary sibling (and, during the two
    renames of a folder, the moved-aside old copy). Only call this while no write can be in
    progress: the caller holds the project's run lock.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.glob(f".*{TMP_TAG}*")) + sorted(directory.glob(f".*{OLD_TAG}*")):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
    others = sorted({p for pattern in _LOOKALIKES for p in directory.glob(pattern)} - set(removed))
    for path in others:
        log.warning(
            "leaving %s alone: it looks like an interrupted write, but not one of this project's",
            path,
        )
    return removed
