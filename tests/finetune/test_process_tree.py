"""One run, one process tree: SIGKILL of the `kedro run` process of a 2-process run (what the OOM
killer does) leaves no process of the run alive, and the next `kedro run` resumes to the adapter of
a 2-process `kedro run` that was never interrupted.

Everything is real: `kedro run --pipeline=sft --to-nodes=train_adapter` in a tiny project copy,
which holds the run lock and starts `accelerate launch` with two gloo ranks on the CPU. Every rank
pauses once it has saved checkpoint 4 (a `sitecustomize` in the killed project's `src`, active
only in ranks started with the test's variable), so the kill lands with both ranks alive and a
complete checkpoint on disk. The runs allow remote code (`model.trust_remote_code`) and the
prepared base model records it: every rank must get that permission, or it refuses the model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import project_copy as pc
from tests.finetune.test_kill_resume import max_difference

# Imported by every Python process started with the killed project's `src` on PYTHONPATH; only
# training ranks (RANK set) of the run with SFT_TEST_STOP_AFTER_SAVE do anything.
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
TRAINING = {
    "max_steps": 8,
    "num_processes": 2,
    "per_device_train_batch_size": 2,
    "learning_rate": 2e-2,
    "logging_steps": 1,
    "save_steps": 4,
    "save_total_limit": 2,
    "precision": "fp32",
}
KEDRO_TRAIN = [
    sys.executable,
    "-m",
    "kedro",
    "run",
    "--pipeline=sft",
    "--to-nodes=train_adapter",
    "--env",
    pc.TINY_ENV,
]


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


def project(root: Path, model_dir: Path | None = None) -> Path:
    pc.make_project(root, model_dir=model_dir)
    pc.set_params(root, {"model": {"trust_remote_code": True}, "training": TRAINING})
    return root


def adapter(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(root / "data/06_models/adapter/adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.long
def test_sigkill_of_kedro_run_leaves_no_process_alive_and_the_next_run_resumes_exactly(tmp_path):
    import psutil

    straight = project(tmp_path / "straight")
    pc.run(KEDRO_TRAIN, straight)

    killed = project(tmp_path / "killed", model_dir=straight / pc.TINY_MODEL)
    (killed / "src" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker = tmp_path / "ranks.stopped"
    env = {
        **pc.env(),
        "PYTHONPATH": str(killed / "src"),
        "COLUMNS": "400",  # log lines unwrapped
        "SFT_TEST_STOP_AFTER_SAVE": "4",
        "SFT_TEST_MARKER": str(marker),
    }
    log_path = tmp_path / "killed.log"
    with log_path.open("w") as log:
        run = subprocess.Popen(
            KEDRO_TRAIN, cwd=killed, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 600
    ranks = [Path(f"{marker}.{rank}") for rank in (0, 1)]
    while not all(m.exists() for m in ranks):
        output = log_path.read_text(errors="replace")[-4000:]
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            raise AssertionError(f"the run never reached checkpoint 4:\n{output}")
        time.sleep(0.1)
    assert psutil.Process(run.pid).cmdline()[1:4] == ["-m", "kedro", "run"]
    tree = psutil.Process(run.pid).children(recursive=True)
    rank_pids = {int(m.read_text()) for m in ranks}
    assert rank_pids <= {p.pid for p in tree}  # accelerate launch and both ranks
    assert len(tree) >= 3

    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    started = time.monotonic()
    while alive(tree) and time.monotonic() - started < 20:
        time.sleep(0.1)
    took = time.monotonic() - started
    left = alive(tree)
    for process in left:
        process.kill()
    print(f"\n  process tree of {len(tree)} gone {took:.1f} s after SIGKILL of `kedro run`")
    assert not left, [p.cmdline() for p in left]

    # The next run: same project, no pause; it takes over the lock the killed run left.
    output = pc.run(KEDRO_TRAIN, killed, extra_env={"COLUMNS": "400"})
    assert "taking over the run lock left by" in output, output[-4000:]
    summary = pc.read_json(killed, "data/08_reporting/training_summary.json")
    assert str(summary["resumed_from"]).endswith("checkpoint-4"), summary
    assert summary["global_step"] == 8 and summary["num_processes"] == 2
    difference = max_difference(adapter(killed), adapter(straight))
    print(f"  max |resumed - uninterrupted| 2-process adapter difference: {difference:.3g}")
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
