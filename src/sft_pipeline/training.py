"""Training: QLoRA, LoRA or full fine-tuning of the base model with the project's SFT trainer.

`train` is the library side of the `train_adapter` node. It maps the typed parameter sections to
an `SFTConfig`, builds the model (4-bit base + LoRA by default), resumes from the last checkpoint
of the *same* run when one exists, trains, and returns the adapter (or full model) as an object
with `save_pretrained`, the trainer's log history and a summary.

With `training.num_processes > 1` the same code runs under `accelerate launch` (this module's
`main` is the entry point of each process); there is no distribution layer of our own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sft_pipeline.config import ConfigError, LoraConfig, QuantizationConfig, TrainingConfig

log = logging.getLogger(__name__)

Method = Literal["qlora", "lora", "full"]
PARAMS_FILE = "training_params.json"
# Written into training.output_dir next to the checkpoints: which run they belong to.
FINGERPRINT_FILE = "run_fingerprint.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# TrainingConfig fields that do not change the trained weights: editing one of them must not
# throw away the checkpoints of an otherwise identical run.
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
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# --------------------------------------------------------------------------- configuration


def training_method(quant: QuantizationConfig, lora: LoraConfig) -> Method:
    """Which of the three methods the two switches select.

    The issue words it as "`lora.enabled: false` gives LoRA on a full-precision base", which
    cannot be meant literally (LoRA switched off cannot give LoRA). The mapping that gives every
    combination one meaning is:

    - `quantization.load_in_4bit: true`  + `lora.enabled: true`  -> QLoRA (the default);
    - `quantization.load_in_4bit: false` + `lora.enabled: true`  -> LoRA on a full-precision base;
    - `quantization.load_in_4bit: false` + `lora.enabled: false` -> full fine-tuning;
    - `quantization.load_in_4bit: true`  + `lora.enabled: false` -> error: 4-bit weights are
      frozen integer codes, there is nothing for a full fine-tune to update.
    """
    if lora.enabled:
        return "qlora" if quant.load_in_4bit else "lora"
    if quant.load_in_4bit:
        raise ConfigError(
            "invalid parameters: `lora.enabled: false` asks for full fine-tuning, but "
            "`quantization.load_in_4bit: true` loads the base as frozen 4-bit weights, which "
            "cannot be fine-tuned directly.\n"
            "  Expected one of: lora.enabled: true (QLoRA), or quantization.load_in_4bit: false "
            "(with lora.enabled: true for LoRA on a full-precision base, false for full "
            "fine-tuning)."
        )
    return "full"


def resolve_precision(requested: str) -> Literal["bf16", "fp16", "fp32"]:
    """`auto` -> bf16 on a GPU that supports it, fp16 on an older GPU; on CPU, the trainer's choice.

    On CPU we follow the trainer's choice (bf16 only with native AVX512-BF16/AMX instructions,
    and only where a short timing shows it faster), so `auto` never asks for something it would
    replace. An
    explicit request is passed through: the trainer warns and falls back where it cannot run.
    """
    if requested != "auto":
        return requested  # type: ignore[return-value]
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    from sft_pipeline.trainer.config import cpu_bf16_is_faster

    return "bf16" if cpu_bf16_is_faster() else "fp32"


def resolve_quantization(quant: QuantizationConfig, lora: LoraConfig) -> QuantizationConfig:
    """Turn `load_in_4bit: auto` into a decision: 4-bit for LoRA on CUDA, else full precision."""
    if quant.load_in_4bit != "auto":
        return quant
    from sft_pipeline.models import wants_4bit

    use_4bit = lora.enabled and wants_4bit(quant)
    log.info(
        "quantization.load_in_4bit: auto -> %s (%s)",
        use_4bit,
        "CUDA: QLoRA" if use_4bit else "no CUDA or full fine-tuning: full-precision base",
    )
    return quant.model_copy(update={"load_in_4bit": use_4bit})


def max_row_length(*datasets) -> int:
    """The longest `input_ids` row over the datasets (the trainer's `max_length`)."""
    import pyarrow.compute as pc

    longest = 0
    for ds in datasets:
        if ds is not None and len(ds):
            lengths = pc.list_value_length(ds.with_format("arrow")["input_ids"])
            longest = max(longest, pc.max(lengths).as_py())
    if longest == 0:
        raise ValueError("train_tokens: no rows with input_ids to train on (expected >= 1 row)")
    return longest


def report_integrations(report_to: str | list[str]) -> list[str]:
    """`training.report_to` with integrations that are not installed dropped (with a warning).

    wandb is switched to offline mode: a pipeline run must not need network or a login.
    """
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
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
    return kept or ["none"]


def build_sft_config(
    training: TrainingConfig,
    *,
    precision: str,
    max_length: int,
    has_eval: bool,
):
    """Map the `training` section onto the trainer's `SFTConfig`."""
    from sft_pipeline.trainer import SFTConfig

    eval_every = has_eval and training.eval_steps is not None
    return SFTConfig(
        output_dir=training.output_dir,
        num_train_epochs=training.num_train_epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.per_device_train_batch_size,
        per_device_eval_batch_size=training.per_device_eval_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type,
        # transformers 5 reads a float in [0, 1) as a ratio of the total steps.
        warmup_steps=training.warmup_ratio,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=training.optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=training.gradient_checkpointing,
        # Non-reentrant checkpointing needs no input-grad hook under PEFT and is torch's advice.
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=training.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        # eval_steps: null -> one evaluation at the end (train() runs it), not during training.
        eval_strategy="steps" if eval_every else "no",
        eval_steps=training.eval_steps if eval_every else None,
        report_to=report_integrations(training.report_to),
        seed=training.seed,
        data_seed=training.seed,
        # Deterministic kernels are free on CPU; on CUDA some ops have no deterministic version.
        full_determinism=_on_cpu(),
        dataloader_num_workers=training.dataloader_num_workers,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
        packing=training.packing,
        padding_free=training.padding_free,
        pad_to_multiple_of=training.pad_to_multiple_of,
        max_length=max_length,
    )


# --------------------------------------------------------------------------- resume


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
    """The training code and the libraries under it.

    DVC re-runs training when this code changes; resuming a checkpoint of the old code (perhaps
    one of the finished run) would hand back the old result.
    """
    from importlib.metadata import version

    package = Path(__file__).parent
    digest = hashlib.sha256()
    for source in sorted(
        [package / "training.py", package / "models.py", *(package / "trainer").glob("*.py")]
    ):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    libraries = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
    return {"sources": digest.hexdigest(), **{name: version(name) for name in libraries}}


def run_fingerprint(
    manifest: dict[str, Any],
    train_tokens,
    eval_tokens,
    quant: QuantizationConfig,
    lora: LoraConfig,
    training: TrainingConfig,
    max_length: int | None = None,
) -> dict[str, Any]:
    """What makes two runs the same run: base model, data, parameters that shape weights, code."""
    params = {
        "max_length": max_length,
        "code": code_fingerprint(),
        "base_model": manifest,
        "train_data": data_fingerprint(train_tokens),
        "eval_data": data_fingerprint(eval_tokens),
        "quantization": quant.model_dump(),
        "lora": lora.model_dump(),
        "training": training.model_dump(exclude=set(_NO_EFFECT_ON_WEIGHTS)),
    }
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return {"fingerprint": hashlib.sha256(blob).hexdigest(), "params": params}


def _step(checkpoint: Path) -> int:
    return int(_CHECKPOINT_RE.match(checkpoint.name).group(1))


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=_step)


def prepare_output_dir(output_dir: Path, fingerprint: dict[str, Any], resume: str) -> Path | None:
    """Return the checkpoint to resume from, or None; clear checkpoints that cannot be resumed.

    A checkpoint is resumed only when `resume` is auto, the fingerprint stored next to it matches
    this run, and it is complete (the trainer writes trainer_state.json last, so a checkpoint
    interrupted mid-save lacks it).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    stored_path = output_dir / FINGERPRINT_FILE
    stored = json.loads(stored_path.read_text()) if stored_path.is_file() else {}
    same_run = stored.get("fingerprint") == fingerprint["fingerprint"]
    checkpoints = _checkpoints(output_dir)
    resume_from = None
    if checkpoints and resume == "never":
        log.info(
            "training.resume is never: removing %d checkpoint(s) in %s",
            len(checkpoints),
            output_dir,
        )
    elif checkpoints and not same_run:
        log.info(
            "checkpoints in %s were made for a different run (base model, data or parameters "
            "changed): removing them and starting from step 0",
            output_dir,
        )
    else:
        complete = [c for c in checkpoints if (c / "trainer_state.json").is_file()]
        resume_from = complete[-1] if complete else None
    for checkpoint in checkpoints:
        # Without a resume point all go; with one, only later (incomplete) ones.
        if resume_from is None or _step(checkpoint) > _step(resume_from):
            if resume_from is not None:
                log.info("removing incomplete checkpoint %s", checkpoint)
            shutil.rmtree(checkpoint)
    stored_path.write_text(json.dumps(fingerprint, indent=2, sort_keys=True, default=str))
    return resume_from


# --------------------------------------------------------------------------- model


def build_model(
    base_model_dir: Path,
    method: Method,
    quant: QuantizationConfig,
    lora: LoraConfig,
    precision: str,
):
    """(base model, peft LoraConfig or None): 4-bit for QLoRA, full precision otherwise.

    The trainer applies the LoRA config (prepare_model_for_kbit_training on a 4-bit base, with
    the checkpointing switch and non-reentrant checkpointing from the SFTConfig, then
    get_peft_model), so that logic exists once.
    """
    import torch
    from peft import LoraConfig as PeftLoraConfig

    from sft_pipeline.models import load_model

    if method == "full":
        # Master weights in fp32: AdamW updates in bf16 lose most small steps; the trainer's
        # autocast gives the bf16/fp16 speed.
        return load_model(base_model_dir, quantization=None, dtype=torch.float32), None
    # The frozen base can live in the compute dtype; peft keeps the adapter weights in fp32.
    dtype = getattr(torch, _TORCH_DTYPES[precision])
    if method == "qlora":
        if quant.bnb_4bit_compute_dtype == "auto":
            # The 4-bit matmuls compute in the training precision unless the user pinned a dtype.
            quant = quant.model_copy(update={"bnb_4bit_compute_dtype": _TORCH_DTYPES[precision]})
        model = load_model(base_model_dir, quantization=quant, dtype=dtype)
    else:
        model = load_model(base_model_dir, quantization=None, dtype=dtype)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
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


# --------------------------------------------------------------------------- artifacts


@dataclass
class TrainedArtifact:
    """The training result: `save_pretrained(dir)` writes adapter (or full model) + tokenizer."""

    model: Any
    tokenizer: Any
    params: dict[str, Any]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        # PeftModel saves only the adapter; a full fine-tune saves the whole model. Both in
        # safetensors (the default, stated to make the artifact's format explicit).
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        (path / PARAMS_FILE).write_text(json.dumps(self.params, indent=2, sort_keys=True))


@dataclass
class FolderArtifact:
    """A training result already on disk (written by the `accelerate launch` processes)."""

    folder: Path

    def save_pretrained(self, path: str | os.PathLike) -> None:
        shutil.copytree(self.folder, path, dirs_exist_ok=True)


# --------------------------------------------------------------------------- train


def train(
    base_model_dir: Path,
    train_tokens,
    eval_tokens,
    quant: QuantizationConfig,
    lora: LoraConfig,
    training: TrainingConfig,
    *,
    max_length: int | None = None,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Fine-tune the base model; return (artifact with save_pretrained, history, summary).

    `max_length` is the tokenization length, the bin size when packing (None: the longest row,
    which leaves packing no room). `callbacks` are extra `transformers.TrainerCallback`s (tests
    use one to simulate a crash); they are not carried into `accelerate launch` processes.
    """
    quant = resolve_quantization(quant, lora)
    training_method(quant, lora)  # fail on a contradictory config before any work
    max_length = max_length or max_row_length(train_tokens, eval_tokens)
    if training.num_processes > 1:
        return _train_distributed(
            base_model_dir, train_tokens, eval_tokens, quant, lora, training, max_length
        )
    return _train_here(
        Path(base_model_dir),
        train_tokens,
        eval_tokens,
        quant,
        lora,
        training,
        callbacks,
        max_length=max_length,
    )


def _train_here(
    base_model_dir: Path,
    train_tokens,
    eval_tokens,
    quant: QuantizationConfig,
    lora: LoraConfig,
    training: TrainingConfig,
    callbacks: Sequence[Any] = (),
    prepared: tuple[dict[str, Any], Path | None] | None = None,
    *,
    max_length: int,
) -> tuple[TrainedArtifact, list[dict[str, Any]], dict[str, Any]]:
    """Train in this process.

    `prepared` is (fingerprint, resume_from) when the launcher has already prepared the output
    folder: the processes of one `accelerate launch` must not each clean it.
    """
    from transformers import set_seed

    from sft_pipeline.models import load_tokenizer
    from sft_pipeline.trainer import SFTTrainer

    method = training_method(quant, lora)
    has_eval = eval_tokens is not None and len(eval_tokens) > 0
    if prepared is None:
        prepared = _prepare_run(
            base_model_dir, train_tokens, eval_tokens, quant, lora, training, max_length
        )
    fingerprint, resume_from = prepared

    args = build_sft_config(
        training,
        precision=resolve_precision(training.precision),
        max_length=max_length,
        has_eval=has_eval,
    )
    # What the trainer will really run: it replaces requests the device cannot honour.
    precision = _precision_of(args)
    # Seed before the model is built: LoRA's initial A matrices are random.
    set_seed(training.seed, deterministic=_on_cpu())
    tokenizer = load_tokenizer(base_model_dir)
    model, peft_config = build_model(base_model_dir, method, quant, lora, precision)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_tokens,
        eval_dataset=eval_tokens if has_eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=list(callbacks) or None,
    )
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    step = trainer.state.global_step
    # eval_steps may already have evaluated the final weights; eval_steps: null never has.
    if has_eval and not any(
        "eval_loss" in h and h["step"] == step for h in trainer.state.log_history
    ):
        trainer.evaluate()

    trained_model = trainer.model
    if method == "full":
        # Training turns the KV cache off; the saved model should generate normally.
        trained_model.config.use_cache = True
    history = per_step_history(trainer.state.log_history)
    trainable, total = count_parameters(trained_model)
    summary = _summary(
        history,
        trainer,
        result,
        method=method,
        trainable=trainable,
        total=total,
        resumed_from=resume_from,
        max_length=max_length,
        rows=(len(train_tokens), len(eval_tokens) if has_eval else 0),
    )
    params = {
        "method": method,
        "precision": precision,
        "max_length": max_length,
        "quantization": quant.model_dump() if method == "qlora" else None,
        "lora": lora.model_dump() if method != "full" else None,
        "training": training.model_dump(),
        "run_fingerprint": fingerprint["fingerprint"],
    }
    return TrainedArtifact(trained_model, tokenizer, params), history, summary


def _prepare_run(
    base_model_dir: Path,
    train_tokens,
    eval_tokens,
    quant: QuantizationConfig,
    lora: LoraConfig,
    training: TrainingConfig,
    max_length: int,
) -> tuple[dict[str, Any], Path | None]:
    """(run fingerprint, checkpoint to resume from or None), with the output folder made ready."""
    from sft_pipeline.models import read_manifest

    fingerprint = run_fingerprint(
        read_manifest(base_model_dir), train_tokens, eval_tokens, quant, lora, training, max_length
    )
    resume_from = prepare_output_dir(Path(training.output_dir), fingerprint, training.resume)
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    return fingerprint, resume_from


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


def _precision_of(args) -> Literal["bf16", "fp16", "fp32"]:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def _on_cpu() -> bool:
    """Deterministic kernels only where they are cheap and available (CPU)."""
    import torch

    return not torch.cuda.is_available()


def _summary(
    history: list[dict[str, Any]],
    trainer,
    result,
    *,
    method: Method,
    trainable: int,
    total: int,
    resumed_from: Path | None,
    max_length: int,
    rows: tuple[int, int],
) -> dict[str, Any]:
    train_losses = [h["loss"] for h in history if h.get("loss") is not None]
    eval_losses = [h["eval_loss"] for h in history if h.get("eval_loss") is not None]
    args = trainer.args
    return {
        "method": method,
        "precision": _precision_of(args),
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
        "trainable_params": int(trainable),
        "total_params": int(total),
        "max_length": max_length,
        "train_rows": rows[0],
        "eval_rows": rows[1],
        "resumed_from": str(resumed_from) if resumed_from else None,
    }


# --------------------------------------------------------------------------- accelerate


def accelerate_command(spec_path: Path, num_processes: int) -> list[str]:
    """The `accelerate launch` command that runs `main(spec_path)` in `num_processes` processes.

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
        "sft_pipeline.training",
        str(spec_path),
    ]


def _train_distributed(
    base_model_dir: Path,
    train_tokens,
    eval_tokens,
    quant: QuantizationConfig,
    lora: LoraConfig,
    training: TrainingConfig,
    max_length: int,
) -> tuple[FolderArtifact, list[dict[str, Any]], dict[str, Any]]:
    output_dir = Path(training.output_dir)
    fingerprint, resume_from = _prepare_run(
        Path(base_model_dir), train_tokens, eval_tokens, quant, lora, training, max_length
    )
    # The processes read the data from Arrow files and write their result next to them. One
    # fixed folder, emptied per launch, so launches do not pile up; the fingerprint ignores it.
    work = output_dir / ".launch"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    train_tokens.save_to_disk(work / "train_tokens")
    if eval_tokens is not None:
        eval_tokens.save_to_disk(work / "eval_tokens")
    spec = {
        "base_model_dir": str(Path(base_model_dir).resolve()),
        "train_tokens": str(work / "train_tokens"),
        "eval_tokens": str(work / "eval_tokens") if eval_tokens is not None else None,
        "quantization": quant.model_dump(),
        "lora": lora.model_dump(),
        "training": training.model_dump(),
        "max_length": max_length,
        "result_dir": str(work / "result"),
        "fingerprint": fingerprint,
        "resume_from": str(resume_from) if resume_from else None,
    }
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = accelerate_command(spec_path, training.num_processes)
    log.info("launching: %s", " ".join(command))
    subprocess.run(command, check=True)
    result = work / "result"
    history = json.loads((result / "history.json").read_text())
    summary = json.loads((result / "summary.json").read_text())
    return FolderArtifact(result / "adapter"), history, summary


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of each `accelerate launch` process: train from a spec file written above."""
    from datasets import load_from_disk

    (spec_path,) = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    training = TrainingConfig.model_validate(spec["training"])
    artifact, history, summary = _train_here(
        Path(spec["base_model_dir"]),
        load_from_disk(spec["train_tokens"]),
        load_from_disk(spec["eval_tokens"]) if spec["eval_tokens"] else None,
        QuantizationConfig.model_validate(spec["quantization"]),
        LoraConfig.model_validate(spec["lora"]),
        training,
        prepared=(spec["fingerprint"], Path(spec["resume_from"]) if spec["resume_from"] else None),
        max_length=spec["max_length"],
    )
    if int(os.environ.get("RANK", "0")) == 0:
        result = Path(spec["result_dir"])
        artifact.save_pretrained(result / "adapter")
        (result / "history.json").write_text(json.dumps(history, indent=2))
        (result / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
