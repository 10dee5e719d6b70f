"""Training in N processes through `accelerate launch`; there is no distribution layer of our own.

    train_adapter (one process)                 accelerate launch --num_processes N
      prepare_run: fingerprint, resume point      rank 0..N-1: main(work)
      job.save(work): job.json + Arrow data  -->     TrainJob.load(work)
      run the command, wait                          train_here(job, prepared=...)
      read work/result  <--------------------------  rank 0 writes adapter, history, summary

The output folder is prepared once, before the launch, so the processes never clean it
concurrently.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from sft_pipeline.finetune import run_state
from sft_pipeline.finetune.job import TrainJob
from sft_pipeline.finetune.workflow import FolderArtifact, Result, train_here

log = logging.getLogger(__name__)
PREPARED_FILE = "prepared.json"


def accelerate_command(work: Path, num_processes: int) -> list[str]:
    """The `accelerate launch` command that runs `main(work)` in `num_processes` processes.

    A user's accelerate config (DDP, FSDP, DeepSpeed) applies as usual; only the process count
    comes from `training.num_processes`.
    """
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--module",
        "sft_pipeline.finetune.launch",
        str(work),
    ]


def train_in_processes(job: TrainJob) -> Result:
    fingerprint, resume_from = run_state.prepare_run(job)
    # One fixed folder, emptied per launch, so launches do not pile up; the fingerprint
    # ignores it.
    work = Path(job.training.output_dir) / ".launch"
    shutil.rmtree(work, ignore_errors=True)
    job.save(work)
    prepared = {
        "fingerprint": fingerprint,
        "resume_from": str(resume_from) if resume_from else None,
    }
    (work / PREPARED_FILE).write_text(json.dumps(prepared, indent=2))
    command = accelerate_command(work, job.training.num_processes)
    log.info("launching: %s", " ".join(command))
    subprocess.run(command, check=True)
    result = work / "result"
    history = json.loads((result / "history.json").read_text())
    summary = json.loads((result / "summary.json").read_text())
    return FolderArtifact(result / "adapter"), history, summary


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of each `accelerate launch` process: train the job saved in `work`."""
    (work,) = argv if argv is not None else sys.argv[1:]
    work = Path(work)
    job = TrainJob.load(work)
    prepared = json.loads((work / PREPARED_FILE).read_text())
    resume_from = Path(prepared["resume_from"]) if prepared["resume_from"] else None
    artifact, history, summary = train_here(job, prepared=(prepared["fingerprint"], resume_from))
    if int(os.environ.get("RANK", "0")) == 0:
        result = work / "result"
        artifact.save_pretrained(result / "adapter")
        (result / "history.json").write_text(json.dumps(history, indent=2))
        (result / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
