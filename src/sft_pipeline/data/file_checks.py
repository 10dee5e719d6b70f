"""Files are checked before they are read: only regular files below a size limit are read as
data files or images.

A path can name something that is not a file of bytes: a FIFO (reading blocks until someone
writes, forever), `/dev/zero` (reads until memory runs out), a folder, a socket. Each is refused
with the kind of thing it is, before any read:

    stat(path)           -> a FIFO, a device, a folder, a socket, or over the limit: refused
    open(O_NONBLOCK)     -> does not wait for a FIFO's writer, if one was swapped in since
    fstat(the open file) -> the same checks on what was opened, then it is read

Limits: `MAX_DATA_FILE_BYTES` for a data file (files are streamed, so this only bounds what a
run will take on), `MAX_IMAGE_FILE_BYTES` for an image file that ingestion hashes (validation
then holds images to `validation.max_image_bytes`, checked the same way before decoding).
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import BinaryIO

MAX_DATA_FILE_BYTES = 2**40  # 1 TiB
MAX_IMAGE_FILE_BYTES = 2**30  # 1 GiB
NOT_FOUND = "no such file"
_BLOCK = 2**20
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnreadableFile(OSError):
    """A path that is not read: `problem` says why (`a FIFO ...`, `no such file`, too large)."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = os.fspath(path)
        self.problem = problem


def _problem(status: os.stat_result, limit: int, limit_name: str) -> str | None:
    if not stat.S_ISREG(status.st_mode):
        kind = next((name for test, name in _KINDS if test(status.st_mode)), "not a file")
        return f"is {kind}, not a regular file; only regular files are read"
    if status.st_size > limit:
        return f"{status.st_size} bytes, over {limit_name}={limit}"
    return None


def check(path: str | os.PathLike, limit: int, limit_name: str) -> str | None:
    """Why `path` is not read (`NOT_FOUND` when it does not exist), or None; nothing is opened."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return NOT_FOUND
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return _problem(status, limit, limit_name)


def open_regular(path: str | os.PathLike, limit: int, limit_name: str) -> BinaryIO:
    """`path` opened for reading when it is a regular file within `limit` bytes; raises
    `UnreadableFile` saying why not, before anything is read."""
    problem = check(path, limit, limit_name)
    if problem:
        raise UnreadableFile(path, problem)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UnreadableFile(path, f"cannot be read: {exc.strerror or exc}") from None
    try:
        problem = _problem(os.fstat(fd), limit, limit_name)
        if problem:
            raise UnreadableFile(path, problem)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, limit: int, limit_name: str) -> bytes:
    """The bytes of a regular file within `limit` (`open_regular`); a file that grew past the
    limit while it was read is refused too."""
    with open_regular(path, limit, limit_name) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnreadableFile(path, f"more than {limit} bytes, over {limit_name}={limit}")
    return data


def sha256_regular(path: str | os.PathLike, limit: int, limit_name: str) -> str:
    """The sha256 of a regular file within `limit`, read in blocks (memory stays flat)."""
    digest, size = hashlib.sha256(), 0
    with open_regular(path, limit, limit_name) as f:
        while block := f.read(_BLOCK):
            size += len(block)
            if size > limit:
                raise UnreadableFile(path, f"more than {limit} bytes, over {limit_name}={limit}")
            digest.update(block)
    return digest.hexdigest()
