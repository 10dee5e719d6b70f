"""`TrainJob`: what one training run needs, in one frozen object, and its mapping onto `SFTConfig`.

The job travels unchanged from the `train_adapter` node through `train` to every process of an
`accelerate launch` (which reads it back from the folder `save` writes), so no function passes
the same seven arguments along.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sft_pipeline.common.config import (
    LoraConfig,
    Method,
    QuantizationConfig,
    TrainingConfig,
    as_list,
    training_method,
)
from sft_pipeline.model import device
from sft_pipeline.model.loading import MANIFEST, read_manifest

# What training returns: (artifact with save_pretrained, per-step history, summary).
Result = tuple[Any, list[dict[str, Any]], dict[str, Any]]

log = logging.getLogger(__name__)
SPEC_FILE = "job.json"
# MLflow's local file store (report_to: mlflow), unless MLFLOW_TRACKING_URI names another.
MLFLOW_DIR = "data/08_reporting/mlruns"


@dataclass(frozen=True)
class TrainJob:
    """A training run: the base model folder, the tokenized data and the three parameter sections.

    `max_length` is the tokenization length: the bin size when packing, the truncation length
    otherwise. `train_tokens`/`eval_tokens` are `datasets.Dataset`s (`eval_tokens` may be None).
    """

    base_model_dir: Path
    train_tokens: Any
    eval_tokens: Any
    quantization: QuantizationConfig
    lora: LoraConfig
    training: TrainingConfig
    max_length: int

    @property
    def method(self) -> Method:
        return training_method(self.quantization, self.lora)

    @property
    def has_eval(self) -> bool:
        return self.eval_tokens is not None and len(self.eval_tokens) > 0

    def for_this_device(self) -> TrainJob:
        """The job with `load_in_4bit: auto` decided (`sft_pipeline.model.device`) and checked."""
        quant = self.quantization
        if _base_is_prequantized(self.base_model_dir):
            # The checkpoint holds only 4-bit codes: QLoRA on them is the one method there is.
            if not self.lora.enabled or quant.load_in_4bit is False:
                from sft_pipeline.common.config import ConfigError

                raise ConfigError(
                    f"{self.base_model_dir}: the base is a pre-quantized bitsandbytes 4-bit "
                    "checkpoint, which trains only as QLoRA; set lora.enabled: true and "
                    "quantization.load_in_4bit: auto or true (or use its full-precision original)"
                )
            quant = quant.model_copy(update={"load_in_4bit": True})
        if quant.load_in_4bit == "auto":
            chosen = device.use_4bit("auto", lora_enabled=self.lora.enabled)
            log.info(
                "quantization.load_in_4bit: auto -> %s (%s)",
                chosen,
                "CUDA: QLoRA" if chosen else "no CUDA or full fine-tuning: full-precision base",
            )
            quant = quant.model_copy(update={"load_in_4bit": chosen})
        job = replace(self, quantization=quant)
        job.method  # noqa: B018 (fails on a contradictory config before any work)
        return job

    def save(self, folder: Path) -> Path:
        """Write the job for `accelerate launch` processes: data as Arrow, the rest as JSON."""
        folder.mkdir(parents=True, exist_ok=True)
        self.train_tokens.save_to_disk(folder / "train_tokens")
        if self.eval_tokens is not None:
            self.eval_tokens.save_to_disk(folder / "eval_tokens")
        spec = {
            "base_model_dir": str(Path(self.base_model_dir).resolve()),
            "has_eval_tokens": self.eval_tokens is not None,
            "quantization": self.quantization.model_dump(),
            "lora": self.lora.model_dump(),
            "training": self.training.model_dump(),
            "max_length": self.max_length,
        }
        path = folder / SPEC_FILE
        path.write_text(json.dumps(spec, indent=2))
        return path

    @classmethod
    def load(cls, folder: Path) -> TrainJob:
        from datasets import load_from_disk

        spec = json.loads((folder / SPEC_FILE).read_text())
        return cls(
            base_model_dir=Path(spec["base_model_dir"]),
            train_tokens=load_from_disk(str(folder / "train_tokens")),
            eval_tokens=load_from_disk(str(folder / "eval_tokens"))
            if spec["has_eval_tokens"]
            else None,
            quantization=QuantizationConfig.model_validate(spec["quantization"]),
            lora=LoraConfig.model_validate(spec["lora"]),
            training=TrainingConfig.model_validate(spec["training"]),
            max_length=spec["max_length"],
        )


def _base_is_prequantized(base_model_dir: Path) -> bool:
    if not (Path(base_model_dir) / MANIFEST).is_file():
        return False
    return bool(read_manifest(base_model_dir).get("quantization"))


def report_integrations(report_to: str | list[str]) -> list[str]:
    """`training.report_to` as transformers' `report_to`: integrations that are not installed
    dropped (with a warning), and dvclive left to our own callback (`finetune.tracking`).

    wandb is switched to offline mode and MLflow to a local file store: a pipeline run must not
    need network or a login.
    """
    from transformers.integrations import (
        is_dvclive_available,
        is_mlflow_available,
        is_tensorboard_available,
        is_wandb_available,
    )

    names = as_list(report_to)
    available = {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
        "dvclive": is_dvclive_available,
    }
    kept = []
    for name in names:
        if name == "none":
            continue
        if name in available and not available[name]():
            log.warning("training.report_to: %s is not installed; not reporting to it", name)
            continue
        kept.append(name)
    if "wandb" in kept:
        os.environ.setdefault("WANDB_MODE", "offline")
    if "mlflow" in kept:
        os.environ.setdefault("MLFLOW_TRACKING_URI", Path(MLFLOW_DIR).resolve().as_uri())
    return [name for name in kept if name != "dvclive"] or ["none"]


# `training` keys that keep their name in SFTConfig (TrainingArguments): passed through as is.
SAME_NAME = (
    "output_dir",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "seed",
    "dataloader_num_workers",
    "packing",
    "padding_free",
    "pad_to_multiple_of",
)


def build_sft_config(job: TrainJob, precision: device.Precision):
    """Map the `training` section onto the trainer's `SFTConfig`: same names pass through."""
    from sft_pipeline.trainer.sft_config import SFTConfig

    training = job.training
    eval_every = job.has_eval and training.eval_steps is not None
    return SFTConfig(
        **{name: getattr(training, name) for name in SAME_NAME},
        # transformers 5 reads a float in [0, 1) as a ratio of the total steps.
        warmup_steps=training.warmup_ratio,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=training.gradient_checkpointing,
        logging_first_step=True,
        save_strategy="steps",
        # eval_steps: null -> one evaluation at the end (the workflow runs it), not during training.
        eval_strategy="steps" if eval_every else "no",
        eval_steps=training.eval_steps if eval_every else None,
        report_to=report_integrations(training.report_to),
        data_seed=training.seed,
        full_determinism=device.deterministic_kernels(),
        include_num_input_tokens_seen="non_padding",
        # Pinned host memory only speeds up copies to a GPU (on a CPU, torch warns per loader).
        dataloader_pin_memory=device.on_cuda(),
        disable_tqdm=False,
        # Rows are truncated by the tokenization node; a padding-free batch is joined into rows
        # of at most max_length tokens (the trainer's max_length would be the joined row's).
        max_length=None if training.padding_free and not training.packing else job.max_length,
        padding_free_row_tokens=job.max_length if training.padding_free else None,
        # The tokens artifact holds rows the pipeline rendered: after the last supervised
        # token (a template's newline after end-of-turn) nothing is trained.
        trim_unsupervised_tail=True,
    )
