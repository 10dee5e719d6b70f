"""One run at a time per project: an OS file lock, and a record of the run's process tree.

Two runs in one project would delete or mix each other's checkpoints and artifacts, so every
run (each `kedro run`, hence each DVC stage) takes this lock before it touches anything::

    <project>/.sft_pipeline/          git-ignored, never a DVC output
      run.lock        flock'ed by the running process; the OS drops the lock when that process
                      ends, however it ends (SIGKILL included)
      run.lock.json   who holds it: pid, host, start time, command, the run's token and, for a
                      DVC stage, the `dvc repro` it belongs to; written after the lock is taken

A second run fails at once with the holder's details (`RunLockedError`). A run that takes the
flock and finds `run.lock.json` of another process knows that process ended without releasing
the lock. It takes over, with a warning, only when nothing of that run is left:

- every process the run started carries its token in `SFT_PIPELINE_RUN_TOKEN` (training
  processes of `accelerate launch` included); while one of them is alive, it may still write
  into `training.output_dir`, and the new run is refused naming its pid;
- a DVC stage (a `kedro run` whose ancestor is `dvc repro` or `dvc exp run`) leaves the lock to
  its `dvc repro` when it ends: until that process ends, only its own next stages run, and a
  `kedro run` started by hand between two stages is refused like one started during a stage.

`flock` is only as reliable as the file system: on NFS, Lustre or SMB a run on another host does
not see it, so a lock folder on such a file system is refused (`UnreliableLockError`); set
`SFT_PIPELINE_LOCK_DIR` to a folder on a local disk to run there anyway (one host at a time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import socket
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sft_pipeline.common import processes
from sft_pipeline.common.atomic import write_text
from sft_pipeline.common.errors import UserError

log = logging.getLogger(__name__)

LOCK_DIR = ".sft_pipeline"
LOCK_FILE = "run.lock"
HOLDER_FILE = "run.lock.json"
RUN_TOKEN_ENV = "SFT_PIPELINE_RUN_TOKEN"
SESSION_WAIT_S = 5.0
LOCK_DIR_ENV = "SFT_PIPELINE_LOCK_DIR"
# The mount table the lock folder's file system type is read from (a test points it elsewhere).
MOUNTS_TABLE = Path("/proc/mounts")
# File systems whose flock is not seen by other hosts, or not honoured at all.
UNRELIABLE_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "lustre", "cifs", "smb3", "smbfs", "9p", "fuse.sshfs", "fuse.glusterfs"}
)


class RunLockedError(UserError, RuntimeError):
    """Another run of this project holds the run lock, or processes of it are still alive."""


class UnreliableLockError(UserError, RuntimeError):
    """The lock folder is on a file system where `flock` cannot keep two runs apart."""


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
    text = (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
        f"command `{holder.get('command')}`"
    )
    session = holder.get("session")
    if session and session.get("pid") != holder.get("pid"):
        text += f", a stage of `{session.get('command')}` (pid {session.get('pid')})"
    elif session:
        text += " (between two of its stages)"
    return text


def filesystem_type(path: Path, mounts: Path | None = None) -> str | None:
    """The type of the file system `path` is on, from the mount table (None when unknown)."""
    table = mounts or MOUNTS_TABLE
    try:
        lines = table.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # The table escapes blanks in mount points as octal (\040).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def dvc_session() -> dict[str, Any] | None:
    """The `dvc repro` / `dvc exp run` this process is a stage of: its nearest such ancestor."""
    import psutil

    try:
        ancestors = psutil.Process().parents()
    except psutil.Error:
        return None
    for process in ancestors:
        try:
            command = process.cmdline()
            if _is_dvc_run(command):
                return {
                    "pid": process.pid,
                    "process_started": process.create_time(),
                    "command": shlex.join(["dvc", *command[_dvc_index(command) + 1 :]]),
                }
        except psutil.Error:
            continue
    return None


def _dvc_index(command: list[str]) -> int:
    for i, arg in enumerate(command):
        if Path(arg).name == "dvc" or (arg == "-m" and command[i + 1 : i + 2] == ["dvc"]):
            return i + (arg == "-m")
    return -1


def _is_dvc_run(command: list[str]) -> bool:
    i = _dvc_index(command)
    if i < 0:
        return False
    rest = command[i + 1 :]
    return "repro" in rest or ("exp" in rest and "run" in rest)


def processes_with_token(token: str) -> list[int]:
    """Live processes (of this user) started by the run whose token is `token`."""
    import psutil

    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            ours = process.environ().get(RUN_TOKEN_ENV) == token
            if ours and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except psutil.Error:
            continue
    return sorted(found)


class RunLock:
    """The run lock of the project at `project`; `acquire` never waits."""

    def __init__(self, project: str | os.PathLike) -> None:
        self.project = Path(project)
        self.folder = self._lock_folder()
        self.lock_path = self.folder / LOCK_FILE
        self.holder_path = self.folder / HOLDER_FILE
        self._lock = None
        self._token: str | None = None

    def _lock_folder(self) -> Path:
        override = os.environ.get(LOCK_DIR_ENV)
        if not override:
            return self.project / LOCK_DIR
        # One folder may serve several projects: each gets its own, named by its path.
        key = hashlib.sha256(os.path.realpath(self.project).encode()).hexdigest()[:16]
        return Path(override) / key

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def read_holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.holder_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def check_filesystem(self) -> None:
        """Refuse a lock folder on a file system where `flock` does not keep hosts apart."""
        existing = next((p for p in [self.folder, *self.folder.parents] if p.exists()), Path("/"))
        kind = filesystem_type(existing)
        if kind in UNRELIABLE_FILESYSTEMS:
            raise UnreliableLockError(
                f"{self.lock_path}: the run lock is on a {kind} file system, where flock does not "
                "keep two runs apart (a run on another host does not see it, and a live run's "
                f"lock could be taken over); put the project on a local disk, or set "
                f"{LOCK_DIR_ENV} to a folder on a local disk and start every run of this project "
                "on this host"
            )

    def acquire(self) -> None:
        """Take the lock, or raise `RunLockedError` naming the run that holds it."""
        from filelock import FileLock, Timeout

        if self.held:
            return
        self.check_filesystem()
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path), timeout=0)
        session = dvc_session()
        try:
            # A DVC stage waits a moment: a run refused between two stages holds the flock for
            # the few milliseconds it takes to read who holds the lock.
            lock.acquire(timeout=SESSION_WAIT_S if session else 0, poll_interval=0.05)
        except Timeout:
            raise RunLockedError(
                f"another run of this project is in progress ({describe(self.read_holder())}); "
                f"one run at a time: wait for it to finish, or stop it (lock: {self.lock_path})"
            ) from None
        try:
            previous = self.read_holder()
            if previous and previous.get("pid") != os.getpid():
                self._check_previous(previous, session)
        except BaseException:
            lock.release(force=True)
            raise
        self._lock = lock
        self._token = uuid.uuid4().hex
        # Every process started from here on carries the token (see the module docstring).
        os.environ[RUN_TOKEN_ENV] = self._token
        info = {**holder_info(), "token": self._token}
        if session:
            info["session"] = session
        write_text(self.holder_path, json.dumps(info, indent=2) + "\n")

    def _check_previous(self, previous: dict[str, Any], session: dict[str, Any] | None) -> None:
        """Raise `RunLockedError` while anything of the previous holder's run is alive."""
        same_host = previous.get("host") == socket.gethostname()
        earlier = previous.get("session") or {}
        ours = bool(session) and session.get("pid") == earlier.get("pid")
        if (
            earlier
            and same_host
            and not ours
            and processes.is_running(int(earlier["pid"]), earlier.get("process_started"))
        ):
            raise RunLockedError(
                f"another run of this project is in progress (`{earlier.get('command')}`, "
                f"pid {earlier.get('pid')} on {previous.get('host')}, between two of its "
                f"stages); one run at a time: wait for it to finish, or stop it "
                f"(lock: {self.lock_path})"
            )
        token = previous.get("token")
        alive = processes_with_token(token) if token and same_host else []
        if alive:
            raise RunLockedError(
                f"the previous run of this project ({describe(previous)}) ended, but process(es) "
                f"{', '.join(map(str, alive))} it started are still alive and may write into its "
                f"output folders; wait for them to end, or stop them (lock: {self.lock_path})"
            )
        if earlier and previous.get("pid") == earlier.get("pid"):
            log.info("run lock: `%s` is no longer running", earlier.get("command"))
            return
        pid = previous.get("pid")
        alive_pid = same_host and isinstance(pid, int) and processes.is_running(pid)
        log.warning(
            "taking over the run lock left by %s: %s",
            describe(previous),
            "that pid exists but no longer holds the lock (reused pid?)"
            if alive_pid
            else "that run ended without releasing it (killed?)",
        )

    def release(self) -> None:
        if not self.held:
            return
        holder = self.read_holder()
        if holder is None or holder.get("pid") == os.getpid():
            session = (holder or {}).get("session")
            if session and processes.is_running(
                int(session["pid"]), session.get("process_started")
            ):
                # A DVC stage: the lock passes to its `dvc repro` until that ends.
                handed = {
                    "pid": session["pid"],
                    "host": holder.get("host"),
                    "started": holder.get("started"),
                    "command": session.get("command"),
                    "token": holder.get("token"),
                    "session": session,
                }
                write_text(self.holder_path, json.dumps(handed, indent=2) + "\n")
            else:
                self.holder_path.unlink(missing_ok=True)
        if os.environ.get(RUN_TOKEN_ENV) == self._token:
            del os.environ[RUN_TOKEN_ENV]
        self._lock.release(force=True)
        self._lock = None
        self._token = None
