"""One run at a time per project: a second run is refused naming the holder, a dead run's lock is
taken over; through real processes, and through `kedro run` in a project copy."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft_pipeline.run.lock import HOLDER_FILE, LOCK_DIR, RunLock, RunLockedError

HOLD = (
    "import sys, time\n"
    "from sft_pipeline.run.lock import RunLock\n"
    "lock = RunLock(sys.argv[1])\n"
    "lock.acquire()\n"
    "time.sleep(600)\n"
)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) first:\n{out[-4000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def hold_lock(project: Path) -> subprocess.Popen:
    """A real process holding the project's run lock (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(project), "--some-flag"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(project / LOCK_DIR / HOLDER_FILE, proc)
    return proc


def test_a_second_run_is_refused_at_once_naming_the_holder(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(RunLockedError) as exc:
            RunLock(tmp_path).acquire()
        assert time.monotonic() - started < 5
        message = str(exc.value)
        assert f"pid {holder.pid}" in message
        assert os.uname().nodename in message
        assert "started 20" in message  # an ISO date
        assert "--some-flag" in message  # the holder's command
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = hold_lock(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_DIR / HOLDER_FILE).exists()  # nobody cleaned up after it

    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.run.lock"):
        lock.acquire()
    try:
        assert f"taking over the run lock left by pid {holder.pid}" in caplog.text
        assert "ended without releasing it" in caplog.text
        assert lock.read_holder()["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_DIR / HOLDER_FILE).exists()
    RunLock(tmp_path).acquire()  # free again


# --------------------------------------------------------------------------- through kedro run

TOKEN = "hf_plantedTokenThatMustNeverLeak0123456789"
TRACKER_KEY = "plantedTrackerKeyThatMustNeverLeak98765"


def start_kedro(root: Path, *args: str) -> subprocess.Popen:
    from tests.project_copy import TINY_ENV, env

    run_env = env()
    for name in ("HF_TOKEN", "WANDB_API_KEY"):
        run_env.pop(name, None)
    run_env["COLUMNS"] = "400"  # rich wraps log lines at the terminal width
    return subprocess.Popen(
        ["kedro", "run", "--env", TINY_ENV, *args],
        cwd=root,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def communicate(proc: subprocess.Popen, timeout: float = 900) -> str:
    """The process's output with whitespace runs (rich's line wrapping) made single spaces."""
    out, _ = proc.communicate(timeout=timeout)
    return " ".join(out.split())


def adapter(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "data/06_models/adapter/adapter_model.safetensors")


@pytest.mark.slow
def test_kedro_runs_one_at_a_time_and_credentials_never_reach_artifacts(tmp_path):
    import shutil

    from tests.project_copy import TINY_ENV, make_project, set_params

    root = make_project(tmp_path / "project")
    set_params(root, {"training": {"max_steps": 16, "save_steps": 4}})
    # Kedro reads credentials of the run's environment (`local` by default, `tiny` here).
    credentials = root / "conf" / TINY_ENV / "credentials.yml"
    credentials.write_text(f"huggingface:\n  token: {TOKEN}\nwandb:\n  api_key: {TRACKER_KEY}\n")
    holder_file = root / LOCK_DIR / HOLDER_FILE

    # A typo'd top-level key stops the run before it takes the lock or writes anything.
    typo = start_kedro(root, "--params", "trainig.max_steps=1")
    out = communicate(typo)
    assert typo.returncode != 0
    assert "trainig" in out and "did you mean `training`" in out
    assert not any((root / "data" / "02_intermediate").iterdir())

    # (b) A second run while the first one works: refused within seconds, naming the first.
    first = start_kedro(root)
    wait_for(holder_file, first)
    started = time.monotonic()
    second = start_kedro(root, "--nodes", "train_adapter")
    second_out = communicate(second)
    refused_after = time.monotonic() - started
    first_out = communicate(first)
    assert second.returncode != 0
    assert "another run of this project is in progress" in second_out
    assert f"pid {first.pid}" in second_out
    assert first.returncode == 0, first_out[-6000:]
    assert first.poll() is not None and refused_after < 120
    print(f"second run refused after {refused_after:.1f} s")
    assert not holder_file.exists()  # released at the end

    # Credentials were read from conf/local/credentials.yml, and appear in no artifact or log.
    assert "credentials from conf/*/credentials.yml: HF_TOKEN, WANDB_API_KEY" in first_out
    for text in (first_out, second_out, out):
        assert TOKEN not in text and TRACKER_KEY not in text
    leaked = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and p != credentials
        and (TOKEN.encode() in p.read_bytes() or TRACKER_KEY.encode() in p.read_bytes())
    ]
    assert leaked == []
    reference = adapter(root)

    # (c) A run killed while holding the lock: the next one takes the lock over.
    killed = start_kedro(root, "--nodes", "train_adapter")
    wait_for(holder_file, killed)
    killed.kill()
    communicate(killed)
    assert holder_file.exists()
    # The next run trains from scratch (no checkpoints), and a killed write's leftover goes.
    shutil.rmtree(root / "data/06_models/checkpoints", ignore_errors=True)
    shutil.rmtree(root / "data/06_models/adapter")
    leftover = root / "data/05_model_input/.train_tokens.sft-pipeline-tmp-killed"
    leftover.mkdir()
    alone = start_kedro(root, "--nodes", "train_adapter")
    alone_out = communicate(alone)
    assert alone.returncode == 0, alone_out[-6000:]
    assert f"taking over the run lock left by pid {killed.pid}" in alone_out
    assert not leftover.exists()

    # The run that shared the project with a refused one trained what a run alone trains.
    alone_adapter = adapter(root)
    difference = max(float((reference[k] - alone_adapter[k]).abs().max()) for k in reference)
    print(f"max |contended - alone| adapter difference: {difference:.3g}")
    assert difference <= 1e-6


# --------------------------------------------------------------------------- the run's processes

HOLD_WITH_CHILD = (
    "import subprocess, sys, time\n"
    "from sft_pipeline.run.lock import RunLock\n"
    "lock = RunLock(sys.argv[1])\n"
    "lock.acquire()\n"
    # A process the run started (like a training rank): it carries the run's token.
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "open(sys.argv[2], 'w').write(str(child.pid))\n"
    "time.sleep(600)\n"
)


def test_a_takeover_is_refused_while_a_process_the_dead_run_started_is_alive(tmp_path, caplog):
    import psutil

    child_file = tmp_path / "child.pid"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_WITH_CHILD, str(tmp_path), str(child_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(child_file, holder)
    child = psutil.Process(int(child_file.read_text()))
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        # The flock went with the holder, but its child may still write: refused, naming it.
        with pytest.raises(RunLockedError) as exc:
            RunLock(tmp_path).acquire()
        assert f"process(es) {child.pid} it started are still alive" in str(exc.value)
        assert f"pid {holder.pid}" in str(exc.value)
    finally:
        child.kill()
        child.wait(timeout=10)
    lock = RunLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.run.lock"):
        lock.acquire()
    try:
        assert f"taking over the run lock left by pid {holder.pid}" in caplog.text
        assert os.environ["SFT_PIPELINE_RUN_TOKEN"] == lock.read_holder()["token"]
    finally:
        lock.release()
    assert "SFT_PIPELINE_RUN_TOKEN" not in os.environ


def test_a_lock_folder_on_nfs_is_refused_naming_the_lock_file_and_the_way_out(
    tmp_path, monkeypatch
):
    from sft_pipeline.run import lock as run_lock

    project = tmp_path / "on nfs" / "project"
    project.mkdir(parents=True)
    local = tmp_path / "local"
    mounts = tmp_path / "mounts"
    # The kernel's table format: blanks in a mount point are written as \040.
    mounts.write_text(
        "/dev/sda1 / ext4 rw,relatime 0 0\n"
        f"server:/export {(tmp_path / 'on nfs').as_posix().replace(' ', chr(92) + '040')} "
        "nfs4 rw,vers=4.2 0 0\n"
    )
    monkeypatch.setattr(run_lock, "MOUNTS_TABLE", mounts)
    assert run_lock.filesystem_type(project) == "nfs4"
    assert run_lock.filesystem_type(local) == "ext4"

    with pytest.raises(run_lock.UnreliableLockError) as exc:
        RunLock(project).acquire()
    message = str(exc.value)
    assert str(project / LOCK_DIR / "run.lock") in message
    assert "nfs4 file system" in message and "SFT_PIPELINE_LOCK_DIR" in message
    assert not (project / LOCK_DIR).exists()

    # The way out: the lock on a local disk.
    monkeypatch.setenv("SFT_PIPELINE_LOCK_DIR", str(local))
    lock = RunLock(project)
    lock.acquire()
    try:
        assert lock.lock_path.parent.parent == local
    finally:
        lock.release()


@pytest.mark.slow
def test_a_kedro_run_started_during_dvc_repro_is_refused_and_stages_read_local_credentials(
    tmp_path, caplog
):
    import json

    from tests.project_copy import env, init_repo, make_project, ran_stages, run

    root = make_project(tmp_path / "project")
    run(["kedro", "dvc", "generate", "--env", "tiny"], root)
    init_repo(root)
    # conf/local is not the stages' Kedro environment (`--env=tiny`), yet its credentials count.
    (root / "conf" / "local" / "credentials.yml").write_text(f"huggingface:\n  token: {TOKEN}\n")
    holder_file = root / LOCK_DIR / HOLDER_FILE
    repro_env = env()
    repro_env.pop("HF_TOKEN", None)
    repro_env["COLUMNS"] = "400"  # rich wraps log lines at the terminal width
    repro_log = tmp_path / "repro.log"
    with repro_log.open("w") as log_file:
        repro = subprocess.Popen(
            ["dvc", "repro", "tokenize_conversations"],  # six stages, one `kedro run` each
            cwd=root,
            env=repro_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    # Wait for the second stage to hold the lock: it took it from the `dvc repro` that the
    # first stage handed it to.
    commands, deadline = [], time.monotonic() + 600
    while len(commands) < 2:
        assert repro.poll() is None, repro_log.read_text()[-6000:]
        assert time.monotonic() < deadline
        try:
            holder = json.loads(holder_file.read_text())
        except (OSError, ValueError):
            holder = {}
        stage = holder.get("session") and holder["pid"] != holder["session"]["pid"]
        if stage and holder["command"] not in commands:
            commands.append(holder["command"])
        time.sleep(0.1)
    user = start_kedro(root, "--nodes", "ingest_records")
    # Meanwhile, probe the lock from outside the repro: never taken, also between two stages.
    refusals = []
    while repro.poll() is None:
        try:
            RunLock(root).acquire()
        except RunLockedError as exc:
            refusals.append(str(exc))
        else:
            raise AssertionError("took the lock of a running dvc repro")
        time.sleep(0.2)
    between = [r for r in refusals if "between two of its stages" in r]
    print(f"{len(refusals)} probes refused, {len(between)} of them between two stages")
    assert between, refusals[-3:]
    user_out = communicate(user)
    repro_out = repro_log.read_text()
    assert repro.returncode == 0, repro_out[-6000:]
    assert user.returncode != 0, user_out[-4000:]
    assert "another run of this project is in progress" in user_out
    assert f"pid {repro.pid}" in user_out and "dvc repro tokenize_conversations" in user_out
    assert len(ran_stages(repro_out)) == 6
    assert "credentials from conf/local/credentials.yml: HF_TOKEN" in " ".join(repro_out.split())
    assert TOKEN not in repro_out and TOKEN not in user_out

    # Once `dvc repro` has ended, the lock is free again, without a takeover warning.
    lock = RunLock(root)
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.run.lock"):
        lock.acquire()
    lock.release()
    assert "taking over" not in caplog.text
