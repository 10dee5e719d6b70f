"""The training workflow: the library side of the `train_adapter` node, top to bottom.

train(job)
  decide 4-bit for this device       TrainJob.for_this_device    (sft_pipeline.model.device)
  N processes? -> accelerate launch  launch.train_in_processes   (each runs train_here)
  train_here(job)
    prepare the run (resume)         run_state.prepare_run
    resolve precision                model_setup.run_precision (the checkpoint's, or decided)
    seed, tokenizer, model           model_setup.build_model
    build the trainer                SFTTrainer(build_sft_config(job, precision), ...)
    train, evaluate the final step
    summarise                        TrainedArtifact, per-step history, summary
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_pipeline.common.errors import NoTrainingRowsError
from sft_pipeline.finetune import model_setup, run_state
from sft_pipeline.finetune.job import Result, TrainJob, build_sft_config
from sft_pipeline.model import device
from sft_pipeline.model.loading import portable_path

PARAMS_FILE = "training_params.json"


@dataclass
class TrainedArtifact:
    """The training result: `save_pretrained(dir)` writes adapter (or full model) + tokenizer."""

    model: Any
    tokenizer: Any
    params: dict[str, Any]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        # PEFT writes the base model's path into adapter_config.json and the adapter's README;
        # loaded through an absolute path (an `accelerate launch` process), it would make the
        # artifact depend on where the project is checked out.
        for config in (getattr(self.model, "peft_config", None) or {}).values():
            if config.base_model_name_or_path and Path(config.base_model_name_or_path).exists():
                config.base_model_name_or_path = portable_path(Path(config.base_model_name_or_path))
        # PeftModel saves only the adapter; a full fine-tune saves the whole model; safetensors.
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        (path / PARAMS_FILE).write_text(json.dumps(self.params, indent=2, sort_keys=True))


def train(job: TrainJob, *, callbacks: Sequence[Any] = ()) -> Result:
    """Fine-tune the base model; return (artifact with save_pretrained, history, summary).

    `callbacks` are extra `transformers.TrainerCallback`s; they are not carried into
    `accelerate launch` processes.
    """
    if len(job.train_tokens) == 0:
        raise NoTrainingRowsError(
            "train_tokens holds no row to train on: tokenization rejected every training row. "
            "token_stats (data/08_reporting/token_stats.json) lists each rejected row with its "
            "reason; the usual one is a prompt as long as tokenization.max_seq_length, which "
            "leaves no supervised token after truncation: raise tokenization.max_seq_length or "
            "shorten the prompts"
        )
    job = job.for_this_device()
    if job.training.num_processes > 1:
        from sft_pipeline.finetune.launch import train_in_processes

        return train_in_processes(job)
    return train_here(job, callbacks=callbacks)


def train_here(
    job: TrainJob,
    *,
    callbacks: Sequence[Any] = (),
    prepared: tuple[dict[str, Any], Path | None] | None = None,
    precision: device.Precision | None = None,
) -> tuple[TrainedArtifact, list[dict[str, Any]], dict[str, Any]]:
    """Train in this process.

    `prepared` is (fingerprint, resume_from) and `precision` the precision when the launcher
    has already decided them: the processes of one `accelerate launch` must not each clean the
    output folder, nor each decide the precision.
    """
    from transformers import set_seed

    from sft_pipeline.finetune import tracking
    from sft_pipeline.model.loading import load_tokenizer_or_processor
    from sft_pipeline.trainer.sft_trainer import SFTTrainer

    fingerprint, resume_from = prepared or run_state.prepare_run(job)
    precision = precision or model_setup.run_precision(job, resume_from)
    # Seed before the model is built: LoRA's initial A matrices are random.
    set_seed(job.training.seed, deterministic=device.deterministic_kernels())
    # A vision-language model trains with its processor (saved with the adapter).
    text_tokenizer, processor = load_tokenizer_or_processor(job.base_model_dir)
    tokenizer = processor if processor is not None else text_tokenizer
    model, peft_config = model_setup.build_model(job, precision)
    trainer = SFTTrainer(
        model=model,
        args=build_sft_config(job, precision),
        train_dataset=job.train_tokens,
        eval_dataset=job.eval_tokens if job.has_eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            *callbacks,
            *tracking.live_callbacks(job.training, resuming=resume_from is not None),
        ]
        or None,
    )
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if job.has_eval and not _evaluated_last_step(trainer):
        trainer.evaluate()

    trained = trainer.model
    if job.method == "full":
        # Training turns the KV cache off; the saved model should generate normally.
        trained.config.use_cache = True
    history = per_step_history(trainer.state.log_history)
    summary = summarise(job, trainer, result, history, precision, resumed_from=resume_from)
    params = {
        "method": job.method,
        "precision": summary["precision"],
        "max_length": job.max_length,
        "quantization": job.quantization.model_dump() if job.method == "qlora" else None,
        "lora": job.lora.model_dump() if job.method != "full" else None,
        "training": job.training.model_dump(),
        "run_fingerprint": fingerprint["fingerprint"],
    }
    return TrainedArtifact(trained, tokenizer, params), history, summary


def _evaluated_last_step(trainer) -> bool:
    # eval_steps may already have evaluated the final weights; eval_steps: null never has.
    step = trainer.state.global_step
    return any("eval_loss" in h and h["step"] == step for h in trainer.state.log_history)


def per_step_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged training step, each with `step` and `loss` (a DVC plot needs both).

    Evaluation entries join the training row of the latest step at or before them; the
    trainer's end-of-training totals are in the summary instead.
    """
    rows = [dict(entry) for entry in log_history if "loss" in entry]
    for entry in log_history:
        if "eval_loss" in entry and rows:
            earlier = [row for row in rows if row["step"] <= entry["step"]] or rows[:1]
            earlier[-1].update({k: v for k, v in entry.items() if k.startswith("eval_")})
    # Every row with the same keys (null where a step has no value): DVC's plot reader fails on
    # rows with differing key sets.
    keys = sorted(set().union(*rows)) if rows else []
    return [{key: row.get(key) for key in keys} for row in rows]


def summarise(
    job: TrainJob,
    trainer,
    result,
    history: list[dict[str, Any]],
    precision: device.Precision,
    *,
    resumed_from: Path | None,
) -> dict[str, Any]:
    """The training summary (`training_summary.json`): what ran, where it ended, how long."""
    train_losses = [h["loss"] for h in history if h.get("loss") is not None]
    eval_losses = [h["eval_loss"] for h in history if h.get("eval_loss") is not None]
    args = trainer.args
    trainable, total = model_setup.count_parameters(trainer.model)
    return {
        "method": job.method,
        # Decided once, by device.resolve_precision, and handed to SFTConfig as it is.
        "precision": precision,
        "precision_decided_by": (
            f"checkpoint {resumed_from.name}"
            if resumed_from is not None
            else device.precision_basis()
            if job.training.precision == "auto"
            else f"training.precision: {job.training.precision}"
        ),
        "optimizer": args.optim if isinstance(args.optim, str) else args.optim.value,
        "seed": args.seed,
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss": train_losses[-1] if train_losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        # This invocation only: a resumed run's earlier sessions are in `history`.
        "train_runtime_s": result.metrics.get("train_runtime"),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "num_processes": args.world_size,
        # Rows per optimizer step over all processes: what a one-process run must use to match.
        "global_batch_size": args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * args.world_size,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "max_length": job.max_length,
        "train_rows": len(job.train_tokens),
        "eval_rows": len(job.eval_tokens) if job.has_eval else 0,
        "resumed_from": str(resumed_from) if resumed_from else None,
    }
