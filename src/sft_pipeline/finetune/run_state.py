"""Run identity and resume: which checkpoints in `training.output_dir` belong to this run.

The resume protocol::

    output_dir/
      run_fingerprint.json    sha256 of (base model, data, weight-shaping parameters, code)
      checkpoint-50/          complete: trainer_state.json is written last by the trainer
      checkpoint-100/         complete
      checkpoint-150/         interrupted mid-save: no trainer_state.json -> removed

A run resumes from the last complete checkpoint only when `training.resume` is `auto` and the
stored fingerprint equals its own; otherwise every checkpoint there is removed and training
starts at step 0. Parameters that do not change the trained weights (logging, save interval,
report_to, ...) are left out of the fingerprint, so editing them keeps the checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from sft_pipeline.finetune.job import TrainJob

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "run_fingerprint.json"
# The library function the fingerprint's code set is walked from (sft_pipeline.code_graph).
TRAINING_ENTRY = "sft_pipeline.finetune.workflow"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# TrainingConfig fields that do not change the trained weights.
_NO_EFFECT_ON_WEIGHTS = frozenset(
    {
        "output_dir",
        "resume",
        "report_to",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "dataloader_num_workers",
    }
)


def data_fingerprint(dataset) -> str:
    """Content hash of a tokenized dataset (ids and labels, row by row, in order)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    if dataset is None:
        return digest.hexdigest()
    table = dataset.with_format("arrow")
    for batch in table.iter(batch_size=4096):
        for column in ("input_ids", "labels"):
            values = batch[column]
            digest.update(pc.list_value_length(values).to_numpy().astype("int64").tobytes())
            flat = pc.list_flatten(values).cast(pa.int64())
            digest.update(flat.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


def code_fingerprint() -> dict[str, str]:
    """The training code (every project module the workflow can run) and the libraries under it.

    The module set comes from the same import-graph walk that gives `train_adapter` its DVC code
    deps: a checkpoint of older training code (perhaps one of the finished run) is not resumed.
    """
    from importlib.metadata import version

    from sft_pipeline.code_graph import module_files, package_graph

    root = package_graph().source_dir
    digest = hashlib.sha256()
    for source in module_files(TRAINING_ENTRY):
        digest.update(source.relative_to(root).as_posix().encode() + b"\0" + source.read_bytes())
    return {"sources": digest.hexdigest(), **{name: version(name) for name in LIBRARIES}}


def run_fingerprint(job: TrainJob, manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: base model, data, parameters that shape weights, code."""
    params = {
        "max_length": job.max_length,
        "code": code_fingerprint(),
        "base_model": manifest,
        "train_data": data_fingerprint(job.train_tokens),
        "eval_data": data_fingerprint(job.eval_tokens),
        "quantization": job.quantization.model_dump(),
        "lora": job.lora.model_dump(),
        "training": job.training.model_dump(exclude=set(_NO_EFFECT_ON_WEIGHTS)),
    }
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return {"fingerprint": hashlib.sha256(blob).hexdigest(), "params": params}


def _step(checkpoint: Path) -> int:
    return int(_CHECKPOINT_RE.match(checkpoint.name).group(1))


def checkpoints(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders in `output_dir`, by step."""
    found = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=_step)


def prepare_output_dir(output_dir: Path, fingerprint: dict[str, Any], resume: str) -> Path | None:
    """Return the checkpoint to resume from, or None; clear checkpoints that cannot be resumed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stored_path = output_dir / FINGERPRINT_FILE
    stored = json.loads(stored_path.read_text()) if stored_path.is_file() else {}
    same_run = stored.get("fingerprint") == fingerprint["fingerprint"]
    found = checkpoints(output_dir)
    resume_from = None
    if found and resume == "never":
        log.info(
            "training.resume is never: removing %d checkpoint(s) in %s",
            len(found),
            output_dir,
        )
    elif found and not same_run:
        log.info(
            "checkpoints in %s were made for a different run (base model, data or parameters "
            "changed): removing them and starting from step 0",
            output_dir,
        )
    else:
        complete = [c for c in found if (c / "trainer_state.json").is_file()]
        resume_from = complete[-1] if complete else None
    for checkpoint in found:
        # Without a resume point all go; with one, only later (incomplete) ones.
        if resume_from is None or _step(checkpoint) > _step(resume_from):
            if resume_from is not None:
                log.info("removing incomplete checkpoint %s", checkpoint)
            shutil.rmtree(checkpoint)
    stored_path.write_text(json.dumps(fingerprint, indent=2, sort_keys=True, default=str))
    return resume_from


def prepare_run(job: TrainJob) -> tuple[dict[str, Any], Path | None]:
    """(run fingerprint, checkpoint to resume from or None), with the output folder made ready."""
    from sft_pipeline.model_loading import read_manifest

    fingerprint = run_fingerprint(job, read_manifest(job.base_model_dir))
    resume_from = prepare_output_dir(
        Path(job.training.output_dir), fingerprint, job.training.resume
    )
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    return fingerprint, resume_from
