"""One run at a time per project: an OS file lock held for the whole `kedro run`.

Two runs in one project would delete or mix each other's checkpoints and artifacts, so every
run (each `kedro run`, hence each DVC stage) takes this lock before it touches anything::

    <project>/.sft_pipeline/          git-ignored, never a DVC output
      run.lock        flock'ed by the running process; the OS drops the lock when that process
                      ends, however it ends (SIGKILL included), so a dead run never blocks
      run.lock.json   who holds it: pid, host, start time, command; written after the lock is
                      taken, removed before it is released

A second run fails at once with the holder's details (`RunLockedError`). A run that finds
`run.lock.json` of another process after taking the lock knows that process died holding it
(a live holder would still have the lock) and takes over with a warning naming it. DVC runs its
stages one after another, each its own `kedro run`, so they take the lock in turn; `dvc exp`
queue runs happen in temporary copies of the project, each with its own lock.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sft_pipeline.common.atomic import write_text

log = logging.getLogger(__name__)

LOCK_DIR = ".sft_pipeline"
LOCK_FILE = "run.lock"
HOLDER_FILE = "run.lock.json"


class RunLockedError(RuntimeError):
    """Another run of this project holds the run lock."""


def holder_info() -> dict[str, Any]:
    """What a refused run or a later takeover is told about this process."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a run whose details are not written yet"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
        f"command `{holder.get('command')}`"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The run lock of the project at `project`; `acquire` never waits."""

    def __init__(self, project: str | os.PathLike) -> None:
        self.folder = Path(project) / LOCK_DIR
        self.lock_path = self.folder / LOCK_FILE
        self.holder_path = self.folder / HOLDER_FILE
        self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def read_holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.holder_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def acquire(self) -> None:
        """Take the lock, or raise `RunLockedError` naming the run that holds it."""
        from filelock import FileLock, Timeout

        if self.held:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunLockedError(
                f"another run of this project is in progress ({describe(self.read_holder())}); "
                f"one run at a time: wait for it to finish, or stop it (lock: {self.lock_path})"
            ) from None
        self._lock = lock
        previous = self.read_holder()
        if previous and previous.get("pid") != os.getpid():
            pid, same_host = previous.get("pid"), previous.get("host") == socket.gethostname()
            alive = same_host and isinstance(pid, int) and _pid_alive(pid)
            log.warning(
                "taking over the run lock left by %s: %s",
                describe(previous),
                "that pid exists but no longer holds the lock (reused pid?)"
                if alive
                else "that run ended without releasing it (killed?)",
            )
        write_text(self.holder_path, json.dumps(holder_info(), indent=2) + "\n")

    def release(self) -> None:
        if not self.held:
            return
        holder = self.read_holder()
        if holder is None or holder.get("pid") == os.getpid():
            self.holder_path.unlink(missing_ok=True)
        self._lock.release(force=True)
        self._lock = None
