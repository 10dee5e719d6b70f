"""One run, one process tree: processes this project starts die with the process that started them.

A `kedro run` with `training.num_processes > 1` is a tree of three levels; the OOM killer (or a
user's `kill -9`) may end any of them without a chance to clean up::

    kedro run                  run lock; exports SFT_PIPELINE_LAUNCHER=<pid>:<start time>
      accelerate launch        started with a parent-death signal (SIGKILL when kedro dies)
        worker rank 0..N-1     started by torchrun in a session of their own; each sets its own
                               parent-death signal (SIGKILL when accelerate launch dies) and
                               watches the kedro process named in SFT_PIPELINE_LAUNCHER

The parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`) is delivered by the kernel, so it
works however the parent ended; the watchdog thread covers the levels in between and systems
without it. Render workers (forked) set the same signal.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

LAUNCHER_ENV = "SFT_PIPELINE_LAUNCHER"
WATCH_INTERVAL_S = 0.5
_PR_SET_PDEATHSIG = 1


def start_time(pid: int) -> float | None:
    """The start time of process `pid` (tells a process from a later one with its reused pid)."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return 0.0


def is_running(pid: int, started: float | None = None) -> bool:
    """Whether `pid` runs and, when `started` is given, is the process that started then."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 0.05
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def die_with_parent(expected_parent: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent ends (Linux); False elsewhere.

    `expected_parent`: the parent this process was started by; if it already ended before the
    signal was set (a race the kernel cannot catch), this process ends now.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)
    return True


def child_dies_with_parent():
    """A `preexec_fn` for `subprocess.Popen`: the child is SIGKILLed when this process ends."""
    parent = os.getpid()

    def preexec() -> None:
        die_with_parent(parent)

    return preexec


def launcher_environment() -> dict[str, str]:
    """Environment entries that let processes started below this one watch it."""
    pid = os.getpid()
    return {LAUNCHER_ENV: f"{pid}:{start_time(pid) or 0.0!r}"}


def watch_launcher(interval_s: float = WATCH_INTERVAL_S) -> threading.Thread | None:
    """Start a daemon thread that SIGKILLs this process once the launcher in
    `SFT_PIPELINE_LAUNCHER` has ended; None when no launcher is named (started by hand)."""
    value = os.environ.get(LAUNCHER_ENV, "")
    pid_text, _, started_text = value.partition(":")
    if not pid_text.isdigit():
        return None
    pid = int(pid_text)
    started = None
    with contextlib.suppress(ValueError):
        started = float(started_text) or None

    def watch() -> None:
        while is_running(pid, started):
            time.sleep(interval_s)
        # stderr, not logging: the process is about to end and logging may hold a lock.
        os.write(2, f"launcher process {pid} ended: stopping this process\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread
