"""Each process of an `accelerate launch` (sft_pipeline.finetune.launch) runs this module:

    python -m sft_pipeline.finetune.worker WORK          one of the N processes of a launch
    python -m sft_pipeline.finetune.worker --wait WORK   a worker machine of a multi-node run

It loads the job the launching process saved in WORK and trains it with the same workflow a
single process runs; rank 0 writes the result back into WORK.

The hand-off of a multi-node run cannot race, whatever order the machines start in:

    main machine                              worker machine
    kedro run: WORK/job + prepared.json       accelerate launch --machine_rank 1 ... --wait WORK
      (launch_id: a fresh name for this run)    torchrun waits in the rendezvous
    accelerate launch --machine_rank 0  ----  rendezvous complete: ranks start on both machines
      rank 0 reads launch_id  --- broadcast -->  rank r: waits until WORK/prepared.json names
                                                 that launch_id (shared filesystems lag), then
                                                 trains the same job

A worker rank only exists once the main machine's launch is running, which it starts after the
job is written; it waits for the job of that launch by name, never for a file newer than itself
(a process started after the job was written would wait forever).
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

    `--wait WORK` (worker machines of a multi-node run) is kept for the command line the docs
    show; every rank of a launch of several processes agrees with rank 0 on the job first.
    """
    # First, before anything slow: this rank ends with accelerate launch and with the pipeline.
    processes.die_with_parent(os.getppid())
    processes.watch_launcher()
    args = list(argv if argv is not None else sys.argv[1:])
    (work,) = [a for a in args if a != "--wait"]
    work = Path(work)
    join_launch(work)
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


def join_launch(work: Path, timeout_s: float = WAIT_TIMEOUT_S) -> str | None:
    """Agree with rank 0 on the launch this process belongs to; wait until its job is here.

    Rank 0 runs on the machine that wrote the job, so it reads the launch's name directly and
    broadcasts it; every rank then waits until `work/prepared.json` holds that name. One process
    alone has nothing to agree on.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState()  # joins the process group the trainer then uses
    named = [_launch_id(work / PREPARED_FILE) if state.process_index == 0 else None]
    dist.broadcast_object_list(named, src=0)
    wait_for_job(work, named[0], timeout_s)
    return named[0]


def _launch_id(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("launch_id")
    except (OSError, ValueError):
        return None


def wait_for_job(work: Path, launch_id: str | None, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Block until `work/prepared.json` names `launch_id` (the job of this launch)."""
    marker = work / PREPARED_FILE
    if launch_id is None:
        raise RuntimeError(
            f"{marker}: rank 0 found no job there; the main machine (machine_rank 0) writes it "
            "before it launches: start the pipeline there, not `accelerate launch`"
        )
    deadline = time.monotonic() + timeout_s
    while _launch_id(marker) != launch_id:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{marker}: the job of launch {launch_id} did not appear within {timeout_s:.0f} s"
                " (SFT_PIPELINE_LAUNCH_WAIT_S); training.output_dir must be on a filesystem "
                "every machine shares, at the same path"
            )
        time.sleep(0.5)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
