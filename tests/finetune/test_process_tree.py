"""One run, one process tree: SIGKILL of the process that holds the run lock and started
`accelerate launch` (what the OOM killer does to `kedro run`) leaves no training rank alive, and
the next run resumes to the adapter of a run that was never interrupted.

The runs are real processes (`train_process.py` holding the project's run lock, as `kedro run`
does, then `accelerate launch` with two gloo ranks on the CPU). Every rank pauses once it has
saved checkpoint 4 (a `sitecustomize` in the test's copy of the package, active only in ranks of
this test), so the kill lands with both ranks alive and a complete checkpoint on disk. The base
model's manifest asks for remote code and the runs allow it (`model.trust_remote_code`): every
rank must get that permission, or it refuses to load the model.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.finetune.test_kill_resume import TrainRun, job_files, max_difference, training

__all__ = ["job_files"]

# Imported by every Python process of the test (the package copy is on PYTHONPATH); only the
# training ranks of the killed run (RANK set, SFT_TEST_STOP_AFTER_SAVE set) do anything.
SITECUSTOMIZE = """
import os

if os.environ.get("SFT_TEST_STOP_AFTER_SAVE") and "RANK" in os.environ:
    import time

    from transformers import Trainer

    _step = int(os.environ["SFT_TEST_STOP_AFTER_SAVE"])
    _save = Trainer._save_checkpoint

    def _save_then_wait(self, *args, **kwargs):
        _save(self, *args, **kwargs)
        if self.state.global_step == _step:
            marker = os.environ["SFT_TEST_MARKER"] + "." + os.environ["RANK"]
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            while True:
                time.sleep(1)

    Trainer._save_checkpoint = _save_then_wait
"""


def alive(processes) -> list:
    import psutil

    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            continue
    return running


@pytest.mark.slow
def test_sigkill_of_the_launcher_leaves_no_rank_alive_and_the_next_run_resumes_exactly(
    job_files, tmp_path
):
    import psutil

    base, code = job_files[0], job_files[3]
    (code / "sitecustomize.py").write_text(SITECUSTOMIZE)
    manifest = json.loads((base / "manifest.json").read_text())
    (base / "manifest.json").write_text(json.dumps({**manifest, "trust_remote_code": True}))
    project = tmp_path / "project"
    project.mkdir()

    def values(folder: Path) -> dict:
        return training(folder, max_steps=8, num_processes=2, per_device_train_batch_size=2)

    straight = TrainRun(
        tmp_path, "straight", job_files, values(tmp_path / "a"), trust_remote_code=True
    )
    straight.finish()

    marker = tmp_path / "ranks.stopped"
    killed = TrainRun(
        tmp_path,
        "killed",
        job_files,
        values(tmp_path / "b"),
        env={"SFT_TEST_STOP_AFTER_SAVE": "4", "SFT_TEST_MARKER": str(marker)},
        run_lock=str(project),
        trust_remote_code=True,
    )
    deadline = time.monotonic() + 600
    ranks = [Path(f"{marker}.{rank}") for rank in (0, 1)]
    while not all(m.exists() for m in ranks):
        assert killed.proc.poll() is None, killed.output()[-4000:]
        assert time.monotonic() < deadline, killed.output()[-4000:]
        time.sleep(0.1)
    tree = psutil.Process(killed.proc.pid).children(recursive=True)
    rank_pids = {int(m.read_text()) for m in ranks}
    assert rank_pids <= {p.pid for p in tree}  # accelerate launch and both ranks
    assert len(tree) >= 3

    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait()
    started = time.monotonic()
    while alive(tree) and time.monotonic() - started < 20:
        time.sleep(0.1)
    took = time.monotonic() - started
    left = alive(tree)
    for process in left:
        process.kill()
    print(f"process tree gone {took:.1f} s after SIGKILL of the launcher")
    assert not left, [p.cmdline() for p in left]

    resumed = TrainRun(
        tmp_path,
        "resumed",
        job_files,
        values(tmp_path / "b"),
        run_lock=str(project),
        trust_remote_code=True,
    )
    summary = resumed.finish()
    assert str(summary["resumed_from"]).endswith("checkpoint-4"), resumed.output()[-4000:]
    assert summary["global_step"] == 8 and summary["num_processes"] == 2
    assert "taking over the run lock left by pid" in resumed.output()
    difference = max_difference(resumed.adapter(), straight.adapter())
    print(f"max |resumed - uninterrupted| 2-process adapter difference: {difference:.3g}")
    assert difference <= 1e-6


def test_the_runs_remote_code_permission_travels_to_the_launched_processes(tmp_path, monkeypatch):
    from sft_pipeline.finetune import launch
    from sft_pipeline.model import loading

    (tmp_path / "manifest.json").write_text(json.dumps({"trust_remote_code": True}))
    work = tmp_path / ".launch"
    work.mkdir()
    for allowed in (True, False):
        loading.allow_remote_code(allowed)
        prepared = {"fingerprint": "f", "resume_from": None, **launch.permissions()}
        (work / launch.PREPARED_FILE).write_text(json.dumps(prepared))
        loading.allow_remote_code(not allowed)  # a fresh rank process knows nothing ...
        launch.apply_permissions(json.loads((work / launch.PREPARED_FILE).read_text()))
        assert loading.remote_code_allowed() is allowed  # ... until it reads prepared.json
    with pytest.raises(loading.ModelResolutionError, match=r"model\.trust_remote_code"):
        loading.trust_remote_code(tmp_path)
