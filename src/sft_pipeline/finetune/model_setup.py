"""Build the model a training job trains: a 4-bit base for QLoRA, full precision otherwise."""

from __future__ import annotations

import json
from pathlib import Path

from sft_pipeline.common.ownership import CHECKPOINT_MARKER
from sft_pipeline.finetune.job import TrainJob
from sft_pipeline.model import device


def build_model(job: TrainJob, precision: device.Precision):
    """(base model, peft LoraConfig or None) for the job's method, in the training precision.

    The trainer applies the LoRA config (prepare_model_for_kbit_training on a 4-bit base, then
    get_peft_model), so that logic exists once.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig

    from sft_pipeline.model.loading import load_model
    from sft_pipeline.trainer import vision

    regions = vision.trained_regions(job.training.train_vision_tower, job.training.train_projector)
    if job.method == "full":
        # Master weights in fp32: AdamW updates in bf16 lose most small steps; the trainer's
        # autocast gives the bf16/fp16 speed.
        model = load_model(job.base_model_dir, dtype=torch.float32)
        if vision.is_vision_model(model):
            vision.freeze_untrained(model, regions)
        return model, None
    # The frozen base can live in the compute dtype; peft keeps the adapter weights in fp32.
    dtype = device.torch_dtype(precision)
    quant = None
    if job.method == "qlora":
        compute = device.compute_dtype(job.quantization.bnb_4bit_compute_dtype, precision)
        quant = job.quantization.model_copy(update={"bnb_4bit_compute_dtype": compute})
    model = load_model(job.base_model_dir, quantization=quant, dtype=dtype)
    lora = job.lora
    targets = lora.target_modules
    if vision.is_vision_model(model):
        targets = vision.lora_target_modules(model, targets, regions)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        task_type="CAUSAL_LM",
    )
    return model, peft_config


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total); peft counts 4-bit packed weights at their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def run_precision(job: TrainJob, resume_from: Path | None) -> device.Precision:
    """The precision a run trains in: the one its checkpoint ran in when it resumes (a run
    resumed on another machine keeps the numerics it started with), else
    `device.resolve_precision` on what this device reports."""
    if resume_from is not None and (resume_from / CHECKPOINT_MARKER).is_file():
        marker = json.loads((resume_from / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
        if marker.get("precision") in ("bf16", "fp16", "fp32"):
            return marker["precision"]
    return device.resolve_precision(job.training.precision)
