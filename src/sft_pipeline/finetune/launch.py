"""Training in N processes through `accelerate launch`; there is no distribution layer of our own.

    train_adapter (one process)                 accelerate launch --num_processes N
      prepare_run: fingerprint, resume point      rank 0..N-1: worker.main(work)
      job.save(work): job.json + Arrow data  -->     TrainJob.load(work)
      run the command, wait                          train_here(job, prepared=...)
      read work/result  <--------------------------  rank 0 writes adapter, history, summary

The output folder is prepared once, before the launch, so the processes never clean it
concurrently. Every process reads the same saved data; accelerate's data loader gives rank r the
r-th per-device slice of each global batch, so N processes x batch b see the rows one process x
batch N*b sees, and the loss is normalized by the supervised tokens of all N slices.

Without `training.accelerate_config` the launch is plain DDP on this machine (`--multi_gpu`:
torchrun-style processes, NCCL on GPUs). On a CPU, `--cpu` would start a single process (it
picks accelerate's one-process launcher), so the processes are started the same way and told
`ACCELERATE_USE_CPU=true`, which makes accelerate join them with gloo. A user's config file
(FSDP2, DeepSpeed, several machines) is passed through; only the process count comes from
`training.num_processes`. Worker machines of a multi-node run start `worker` with `--wait` (see
docs/distributed.md): their ranks train the job this machine's launch names.

One run, one process tree (`sft_pipeline.common.processes`): `accelerate launch` is SIGKILLed by
the kernel when the process that started it ends, each rank when `accelerate launch` ends, and
each rank also watches the starting process itself; so a SIGKILLed `kedro run` leaves no rank
writing into `output_dir`. `model.trust_remote_code` of the run travels in `prepared.json`: the
ranks (worker machines included) load the model with the same permission as the pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from sft_pipeline.common import processes
from sft_pipeline.common.atomic import write_text
from sft_pipeline.common.errors import TrainingDivergedError
from sft_pipeline.finetune import model_setup, run_state
from sft_pipeline.finetune.job import Result, TrainJob
from sft_pipeline.model import device, loading

log = logging.getLogger(__name__)
PREPARED_FILE = "prepared.json"
# Written by rank 0 when training diverged: the launcher re-raises its message (not a bare
# "exit status 1" of accelerate).
DIVERGED_FILE = "diverged.txt"
# accelerate config `distributed_type`s that name a launcher of their own; any other one (NO,
# MULTI_CPU, MULTI_GPU) still needs `--multi_gpu` to start more than one process.
_OWN_LAUNCHER = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")


def accelerate_command(
    work: Path, num_processes: int, config_file: str | os.PathLike | None = None
) -> list[str]:
    """The `accelerate launch` command that runs `main(work)` in `num_processes` processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += ["--num_processes", str(num_processes)]
    distributed_type = None
    if config_file is not None:
        import yaml

        config = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        distributed_type = str(config.get("distributed_type") or "NO").upper()
        command += ["--config_file", str(config_file)]
        if distributed_type in ("FSDP", "DEEPSPEED") and not device.on_cuda():
            # accelerate's AcceleratorState turns FSDP on only for accelerator process groups
            # (MULTI_GPU, MULTI_XPU, ...), never for MULTI_CPU: on a CPU the processes run DDP.
            log.warning(
                "training.accelerate_config asks for %s, which accelerate runs on GPUs only; on "
                "this CPU the %d processes train as plain DDP (gloo)",
                distributed_type,
                num_processes,
            )
    else:
        # One machine; port 0: accelerate picks a free port, so two runs never collide.
        command += ["--num_machines", "1", "--main_process_port", "0"]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if distributed_type not in _OWN_LAUNCHER:
        command.append("--multi_gpu")
    return [*command, "--module", "sft_pipeline.finetune.worker", str(work)]


def launch_environment() -> dict[str, str]:
    """The launch's environment: on a CPU, accelerate joins the processes with gloo."""
    env = {**os.environ, **processes.launcher_environment()}
    if not device.on_cuda():
        env["ACCELERATE_USE_CPU"] = "true"
    return env


@dataclass
class FolderArtifact:
    """A training result already on disk (written by the `accelerate launch` processes)."""

    folder: Path

    def save_pretrained(self, path: str | os.PathLike) -> None:
        shutil.copytree(self.folder, path, dirs_exist_ok=True)


def permissions() -> dict[str, bool]:
    """What this run allows that a launched process must allow too (`model.trust_remote_code`)."""
    return {"trust_remote_code": loading.remote_code_allowed()}


def apply_permissions(prepared: dict) -> None:
    """In a launched process: allow what the run that wrote `prepared.json` allows."""
    loading.allow_remote_code(bool(prepared.get("trust_remote_code")))


def train_in_processes(job: TrainJob) -> Result:
    fingerprint, resume_from = run_state.prepare_run(job)
    # Decided here, once, for every process: ranks on machines with other CPU flags or GPUs
    # would otherwise decide differently and break their collectives.
    precision = model_setup.run_precision(job, resume_from)
    # One fixed folder, emptied per launch, so launches do not pile up; the fingerprint
    # ignores it.
    work = Path(job.training.output_dir) / ".launch"
    shutil.rmtree(work, ignore_errors=True)
    job.save(work)
    prepared = {
        # This launch's name: the ranks of every machine agree on it with rank 0 and train the
        # job that carries it (sft_pipeline.finetune.worker.join_launch).
        "launch_id": uuid.uuid4().hex,
        "fingerprint": fingerprint,
        "resume_from": str(resume_from) if resume_from else None,
        "precision": precision,
        **permissions(),
    }
    # Written last and atomically, before the launch: a rank of any machine starts only after
    # the rendezvous with this machine's launch, so the job is there (or on its way through a
    # shared filesystem) when it looks.
    write_text(work / PREPARED_FILE, json.dumps(prepared, indent=2))
    command = accelerate_command(work, job.training.num_processes, job.training.accelerate_config)
    log.info("launching: %s", " ".join(command))
    try:
        subprocess.run(
            command,
            check=True,
            env=launch_environment(),
            preexec_fn=processes.child_dies_with_parent(),
        )
    except subprocess.CalledProcessError:
        diverged = work / DIVERGED_FILE
        if diverged.is_file():
            raise TrainingDivergedError(diverged.read_text(encoding="utf-8")) from None
        raise
    result = work / "result"
    history = json.loads((result / "history.json").read_text())
    summary = json.loads((result / "summary.json").read_text())
    return FolderArtifact(result / "adapter"), history, summary
