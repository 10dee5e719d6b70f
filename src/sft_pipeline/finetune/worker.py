"""Each process of an `accelerate launch` (sft_pipeline.finetune.launch) runs this module:

    python -m sft_pipeline.finetune.worker WORK          one of the N processes of a launch
    python -m sft_pipeline.finetune.worker --wait WORK   a worker machine of a multi-node run

It loads the job the launching process saved in WORK and trains it with the same workflow a
single process runs; rank 0 writes the result back into WORK.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from sft_pipeline.common import processes
from sft_pipeline.common.atomic import write_text
from sft_pipeline.common.errors import TrainingDivergedError
from sft_pipeline.finetune.job import TrainJob
from sft_pipeline.finetune.launch import DIVERGED_FILE, PREPARED_FILE, apply_permissions
from sft_pipeline.finetune.workflow import train_here

WAIT_TIMEOUT_S = float(os.environ.get("SFT_PIPELINE_LAUNCH_WAIT_S", "3600"))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of each `accelerate launch` process: train the job saved in `work`.

    `--wait WORK` (worker machines of a multi-node run): first wait until the machine running
    the pipeline has written a job there, newer than this process.
    """
    # First, before anything slow: this rank ends with accelerate launch and with the pipeline.
    processes.die_with_parent(os.getppid())
    processes.watch_launcher()
    args = list(argv if argv is not None else sys.argv[1:])
    wait = "--wait" in args
    (work,) = [a for a in args if a != "--wait"]
    work = Path(work)
    if wait:
        wait_for_job(work, since=time.time())
    job = TrainJob.load(work)
    prepared = json.loads((work / PREPARED_FILE).read_text())
    resume_from = Path(prepared["resume_from"]) if prepared["resume_from"] else None
    apply_permissions(prepared)
    try:
        artifact, history, summary = train_here(
            job,
            prepared=(prepared["fingerprint"], resume_from),
            precision=prepared.get("precision"),
        )
    except TrainingDivergedError as exc:
        # Every rank stops at the same step (the guard gathers all ranks' values); one tells.
        if int(os.environ.get("RANK", "0")) == 0:
            write_text(work / DIVERGED_FILE, str(exc))
        raise
    if int(os.environ.get("RANK", "0")) == 0:
        result = work / "result"
        artifact.save_pretrained(result / "adapter")
        (result / "history.json").write_text(json.dumps(history, indent=2))
        (result / "summary.json").write_text(json.dumps(summary, indent=2))


def wait_for_job(work: Path, since: float, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Block until `work/prepared.json` exists and was written after `since` (not a stale run)."""
    marker = work / PREPARED_FILE
    deadline = time.time() + timeout_s
    while not (marker.is_file() and marker.stat().st_mtime >= since - 1):
        if time.time() > deadline:
            raise TimeoutError(
                f"{marker}: no job written there within {timeout_s:.0f} s; start the pipeline on "
                "the main machine (machine_rank 0) with the same training.output_dir on a "
                "shared filesystem"
            )
        time.sleep(2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
