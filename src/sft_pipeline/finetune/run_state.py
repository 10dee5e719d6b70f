"""Run identity and resume: which checkpoints in `training.output_dir` belong to this run.

The resume protocol::

    output_dir/
      run_fingerprint.json    sha256 of (base model, data, weight-shaping parameters, code);
                              written atomically, an unreadable one counts as "another run"
      checkpoint-50/          complete (see below)
      checkpoint-100/         complete -> resumed from
      checkpoint-150/         killed mid-save: trainer_state.json missing or truncated -> removed
      checkpoint-7/           no sft_pipeline_checkpoint.json: not written by this project's
                              trainer -> left alone, with a warning (never resumed, never removed)
      .run_fingerprint.json.sft-pipeline-tmp-*   left by a kill inside an atomic write -> removed
      previous_run/           the checkpoints (and fingerprint) of the last run with another
                              fingerprint, set aside, never resumed from there

The trainer writes a checkpoint in this order: weights (+ tokenizer, training_args.json),
optimizer.pt + scheduler.pt, rng_state*.pth, trainer_state.json last; then it rotates out old
checkpoints (save_total_limit), which a kill can leave half deleted. A checkpoint is complete
when trainer_state.json parses and names its step, every safetensors weight file is whole (its
header's offsets reach exactly the file's end) and the optimizer, scheduler and RNG files are
there and whole (readable zip archives; nothing is unpickled to check them). Incomplete ones are
skipped with a warning naming them; those after the checkpoint resumed from are removed.

A run resumes from the last complete checkpoint only when `training.resume` is `auto` and the
stored fingerprint equals its own; otherwise its checkpoints are moved to `previous_run/`
(replacing the set put aside before), with a warning naming what changed (the training code, a
library version, the data, which parameter), and training starts at step 0: hours of training
are never deleted by a `git pull` or a library upgrade. Parameters that do not change the
trained weights (logging, save interval, report_to, ...) are left out of the fingerprint, so
editing them keeps the checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

from sft_pipeline.common.atomic import remove_leftovers, write_text
from sft_pipeline.common.ownership import (
    CHECKPOINT_MARKER,
    checkpoint_step,
    foreign_checkpoints,
    own_checkpoints,
)
from sft_pipeline.common.safetensors_files import weights_problem
from sft_pipeline.finetune.job import TrainJob

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "run_fingerprint.json"
# Where the checkpoints of the last run with another fingerprint are kept (one set).
PREVIOUS_RUN = "previous_run"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
TRAINER_STATE = "trainer_state.json"
# A checkpoint holds its weights in one of these layouts (adapter, whole model, sharded model).
_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
# TrainingConfig fields that do not change the trained weights.
_NO_EFFECT_ON_WEIGHTS = frozenset(
    {
        "output_dir",
        "resume",
        "report_to",
        "live_dir",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "dataloader_num_workers",
    }
)


# Manifest keys that say where the base model was found, not what it is: the same weights
# (`content_hash`, `revision`, the tokenizer's description) in another folder or clone are the
# same run.
_LOCATION_KEYS = frozenset({"name", "model_path"})


def data_fingerprint(dataset) -> str:
    """Content hash of a tokenized dataset: every column it holds, row by row, in order.

    The columns are the ones present, not a list of known names: ids and labels, and whatever
    else the collator hands the model (pixel values and their shapes, image grids, token type
    ids) and `record_id`, the content id of the record, which hashes its images' bytes. A
    picture changed in place (same size, so the same ids) is another run.
    """
    digest = hashlib.sha256()
    if dataset is None:
        return digest.hexdigest()
    table = dataset.with_format("arrow")
    for batch in table.iter(batch_size=4096):
        for name in sorted(batch.column_names):
            digest.update(name.encode() + b"\0")
            _hash_array(digest, batch[name].combine_chunks())
    return digest.hexdigest()


def _hash_array(digest, array) -> None:
    """Feed an Arrow array's values (nested lists by their lengths, then their values) to
    `digest`, independent of how the array is chunked or sliced in memory."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    digest.update(str(kind).encode() + b"\0")
    if array.null_count:
        digest.update(array.is_null().to_numpy(zero_copy_only=False).tobytes())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        lengths = pc.list_value_length(array).fill_null(0)
        digest.update(lengths.to_numpy(zero_copy_only=False).astype("int64").tobytes())
        _hash_array(digest, pc.list_flatten(array))
    elif pa.types.is_struct(kind):
        for k in range(kind.num_fields):
            _hash_array(digest, array.field(k))
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        for value in array.to_pylist():
            data = b"" if value is None else value.encode() if isinstance(value, str) else value
            digest.update(len(data).to_bytes(8, "little") + data)
    else:
        digest.update(array.to_numpy(zero_copy_only=False).tobytes())


def code_fingerprint() -> dict[str, str]:
    """The training code (every project module the workflow can run) and the libraries under it.

    The module set comes from the same import-graph walk that gives `train_adapter` its DVC code
    deps: a checkpoint of older training code (perhaps one of the finished run) is not resumed.
    """
    from importlib.metadata import version

    # The walk starts from every module of this module's own package (the training recipe), so
    # no module name is spelled out that a rename could leave pointing at nothing.
    from sft_pipeline.repro.code_graph import package_files, package_graph

    root = package_graph().source_dir
    digest = hashlib.sha256()
    for source in package_files(__package__):
        digest.update(source.relative_to(root).as_posix().encode() + b"\0" + source.read_bytes())
    return {"sources": digest.hexdigest(), **{name: version(name) for name in LIBRARIES}}


def run_fingerprint(job: TrainJob, manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: base model, data, parameters that shape weights, code.

    Nothing in it depends on the day, the host or the folder the run is in
    (docs/reproducibility.md): the data are hashed by content (rendered with the fixed
    `template.date`), the base model by its content hash, paths and timing settings are left
    out.
    """
    params = {
        "max_length": job.max_length,
        "code": code_fingerprint(),
        "base_model": {k: v for k, v in manifest.items() if k not in _LOCATION_KEYS},
        "train_data": data_fingerprint(job.train_tokens),
        "eval_data": data_fingerprint(job.eval_tokens),
        "quantization": job.quantization.model_dump(),
        "lora": job.lora.model_dump(),
        "training": job.training.model_dump(exclude=set(_NO_EFFECT_ON_WEIGHTS)),
    }
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return {"fingerprint": hashlib.sha256(blob).hexdigest(), "params": params}


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete."""
    state_path = checkpoint / TRAINER_STATE
    if not state_path.is_file():
        return f"no {TRAINER_STATE} (interrupted while saving)"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{TRAINER_STATE} is unreadable or truncated ({exc})"
    if not isinstance(state, dict) or state.get("global_step") != checkpoint_step(checkpoint):
        return f"{TRAINER_STATE} does not record step {checkpoint_step(checkpoint)}"
    weights = [checkpoint / name for name in _WEIGHTS if (checkpoint / name).is_file()]
    if not weights:
        return f"no weights ({' or '.join(_WEIGHTS)})"
    for path in weights:
        # Each safetensors file whole: its header's offsets reach exactly the file's end.
        problem = weights_problem(path)
        if problem:
            return problem
    if (checkpoint / "optimizer.pt").is_file() or not _has_sharded_state(checkpoint):
        # The plain layout (one process, DDP); FSDP and DeepSpeed save their own folders.
        required = ["optimizer.pt", "scheduler.pt"]
        rng = sorted(checkpoint.glob("rng_state*.pth"))
        if not rng:
            return "no rng_state*.pth"
        for path in [*(checkpoint / name for name in required), *rng]:
            problem = _torch_file_problem(path)
            if problem:
                return problem
    return None


def _has_sharded_state(checkpoint: Path) -> bool:
    return any(
        p.is_dir() and p.name.startswith(("optimizer", "pytorch_model_fsdp", "global_step"))
        for p in checkpoint.iterdir()
    )


def _torch_file_problem(path: Path) -> str | None:
    # torch.save writes a zip archive whose directory sits at its end: a truncated file has none.
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path):
            pass
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{path.name} is truncated or not a torch archive ({exc})"
    return None


def read_fingerprint(path: Path) -> dict[str, Any]:
    """The stored run fingerprint, or {} (with a warning) when it is missing or unreadable."""
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s): treating its checkpoints as another run's", path, exc)
        return {}
    return stored if isinstance(stored, dict) else {}


def prepare_output_dir(output_dir: Path, fingerprint: dict[str, Any], resume: str) -> Path | None:
    """Return the checkpoint to resume from, or None; set aside checkpoints of another run."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for leftover in remove_leftovers(output_dir):
        log.info("removed %s, left by an interrupted write", leftover)
    stored_path = output_dir / FINGERPRINT_FILE
    stored = read_fingerprint(stored_path)
    same_run = stored.get("fingerprint") == fingerprint["fingerprint"]
    found = own_checkpoints(output_dir)
    for other in foreign_checkpoints(output_dir):
        log.warning(
            "leaving %s alone: it was not written by this project's trainer (no %s); move it "
            "out of training.output_dir if it is not needed there",
            other,
            CHECKPOINT_MARKER,
        )
    resume_from = None
    if found and (resume == "never" or not same_run):
        why = (
            "training.resume is never"
            if same_run
            else "made for a different run: "
            + "; ".join(fingerprint_changes(stored.get("params"), fingerprint.get("params", {})))
        )
        aside = set_aside(output_dir, found, stored)
        log.warning(
            "checkpoints %s in %s are not resumed (%s): moved to %s, training starts from step "
            "0. Only the last set put aside is kept; to resume that run, undo the change and "
            "move its checkpoints back",
            ", ".join(c.name for c in found),
            output_dir,
            why,
            aside,
        )
    elif found:
        complete = []
        for checkpoint in found:
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                complete.append(checkpoint)
            else:
                log.warning("skipping incomplete checkpoint %s: %s", checkpoint, problem)
        resume_from = complete[-1] if complete else None
        for checkpoint in found:
            # The incomplete ones (after the resume point, or all without one), which the
            # trainer would otherwise save over or count towards save_total_limit.
            if resume_from is None or checkpoint_step(checkpoint) > checkpoint_step(resume_from):
                log.info("removing incomplete checkpoint %s", checkpoint)
                shutil.rmtree(checkpoint)
    _write_fingerprint(stored_path, fingerprint)
    return resume_from


def _write_fingerprint(path: Path, fingerprint: dict[str, Any]) -> None:
    write_text(path, json.dumps(fingerprint, indent=2, sort_keys=True, default=str))


def set_aside(output_dir: Path, checkpoints: list[Path], stored: dict[str, Any]) -> Path:
    """Move a run's checkpoints (and its fingerprint) to `output_dir/previous_run`.

    The set already there is dropped first, unless it is this same run's (a kill while moving
    left part of it there): the fingerprint is written before any checkpoint moves, so a
    second attempt adds the rest to the same set instead of deleting the first part.
    """
    aside = output_dir / PREVIOUS_RUN
    there = read_fingerprint(aside / FINGERPRINT_FILE)
    if aside.exists() and (not there or there.get("fingerprint") != stored.get("fingerprint")):
        shutil.rmtree(aside)
    aside.mkdir(exist_ok=True)
    _write_fingerprint(aside / FINGERPRINT_FILE, stored)
    for checkpoint in checkpoints:
        target = aside / checkpoint.name
        if target.exists():
            shutil.rmtree(target)
        checkpoint.rename(target)
    return aside


def fingerprint_changes(old: Any, new: dict[str, Any]) -> list[str]:
    """What differs between two runs' fingerprint params, in words a user can act on."""
    if not isinstance(old, dict) or not old:
        return ["its fingerprint is missing or unreadable"]
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if key == "code" and isinstance(before, dict) and isinstance(after, dict):
            for part in sorted(set(before) | set(after)):
                if before.get(part) != after.get(part):
                    changes.append(
                        "the training code (a source file of the training recipe)"
                        if part == "sources"
                        else f"{part} {before.get(part)} -> {after.get(part)}"
                    )
        elif key in ("train_data", "eval_data"):
            changes.append(f"the {key.replace('_', ' ')} (tokens artifact content)")
        elif key == "base_model":
            changes.append("the base model")
        elif isinstance(before, dict) and isinstance(after, dict):
            changes.extend(
                f"{key}.{name} {before.get(name)!r} -> {after.get(name)!r}"
                for name in sorted(set(before) | set(after))
                if before.get(name) != after.get(name)
            )
        else:
            changes.append(f"{key} {before!r} -> {after!r}")
    return changes


def prepare_run(job: TrainJob) -> tuple[dict[str, Any], Path | None]:
    """(run fingerprint, checkpoint to resume from or None), with the output folder made ready."""
    from sft_pipeline.model.loading import read_manifest

    fingerprint = run_fingerprint(job, read_manifest(job.base_model_dir))
    resume_from = prepare_output_dir(
        Path(job.training.output_dir), fingerprint, job.training.resume
    )
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    return fingerprint, resume_from
