"""`SFTConfig`: `transformers.TrainingArguments` plus the fields supervised fine-tuning needs.

A requested precision that cannot run on this device is replaced by the best one that can, with
one warning, by the rules of `sft_pipeline.model.device`, so every code path (our trainer, the Kedro
node, a user's script) sees the same decision.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from sft_pipeline.model.device import resolve_precision

log = logging.getLogger(__name__)


def _option(default: Any, text: str) -> Any:
    """A field with its default and the help text `HfArgumentParser` shows on a command line."""
    return field(default=default, metadata={"help": text})


@dataclass
class SFTConfig(TrainingArguments):
    """Training arguments for `SFTTrainer`; every `TrainingArguments` field is accepted too."""

    # Dict fields a command line may give as JSON strings.
    _VALID_DICT_FIELDS: ClassVar[list[str]] = [
        *TrainingArguments._VALID_DICT_FIELDS,
        "model_init_kwargs",
        "dataset_kwargs",
    ]

    max_length: int | None = _option(
        1024, "Truncate tokenized rows to this many tokens; the bin size when packing."
    )
    max_seq_length: int | None = _option(None, "Alias of `max_length` (the older TRL name).")
    packing: bool = _option(
        False, "Best-fit-decreasing packing of rows into `max_length` bins, kept apart."
    )
    padding_free: bool = _option(
        False,
        "Without packing: join each batch's rows into one row (or rows of at most "
        "`padding_free_row_tokens`), kept apart like packed ones. Same rows per step (same loss), "
        "no compute on padding. As in TRL it needs max_length=None (rows already truncated) unless "
        "packing, since a joined batch is longer than `max_length`.",
    )
    padding_free_row_tokens: int | None = _option(
        None,
        "With padding_free and no packing: re-pack each batch into rows of at most this many tokens"
        " instead of one row, which bounds attention's cost per row (rows longer than it keep a row"
        " of their own).",
    )
    trim_unsupervised_tail: bool | None = _option(
        None,
        "End each row at its last supervised token: what follows is never trained and only costs "
        "compute. None: for rows the trainer renders, not for pre-tokenized rows (the user's own "
        "tokens, kept whole as TRL keeps them). The pipeline sets True: its tokens artifact is pre-"
        "tokenized rows it rendered itself.",
    )
    eval_packing: bool | None = _option(None, "Pack the eval set too; defaults to `packing`.")
    pad_to_multiple_of: int | None = _option(
        None, "Pad each batch's length up to a multiple of this."
    )
    dataset_text_field: str = _option("text", "Column with plain text for language-modelling data.")
    completion_only_loss: bool | None = _option(
        None,
        "Loss on the completion only (prompt-completion data, prompt/response records, a pre-"
        "tokenized `completion_mask`). None: yes for those, no for plain text. False trains on "
        "every token.",
    )
    assistant_only_loss: bool | None = _option(
        None,
        "Loss on the assistant turns only (conversational data). None: yes. False trains on every "
        "token of the conversation; True on data without turns is an error.",
    )
    loss_chunk_size: int = _option(
        512, "Supervised tokens per LM-head + cross-entropy chunk (bounds logit memory)."
    )
    max_tokens_per_forward: int = _option(
        0,
        "Run each batch through forward+backward in row slices of at most this many tokens (same "
        "gradients: every slice's loss is normalized by the step's supervised tokens). Bounds "
        "activation memory at some speed cost (on a 2-core CPU, 4x512 packed tokens took 57 s "
        "whole, 94 s in 2 slices, 176 s in 4). 0: never slice.",
    )
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when `model` is a path."},
    )
    loss_type: str = field(
        default="nll",
        metadata={
            "help": "'nll': mean token cross-entropy over the supervised tokens. 'dft': each "
            "token's cross-entropy weighted by the model's (detached) probability of it, Dynamic "
            "Fine-Tuning. 'chunked_nll' is TRL's older name of 'nll' (ours is always chunked).",
            "choices": ["nll", "dft", "chunked_nll"],
        },
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "'bfd': best-fit-decreasing bins of whole rows (truncated to max_length), kept "
            "apart in attention. 'bfd_split': the same, a row longer than max_length is split "
            "into pieces instead of truncated. 'wrapped': rows joined end to end and cut every "
            "max_length tokens, attending across row boundaries (TRL's 'wrapped').",
            "choices": ["bfd", "bfd_split", "wrapped"],
        },
    )
    dataset_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Dataset preparation options; {'skip_prepare_dataset': True} hands the "
            "datasets to the collator as they are (they must hold input_ids, and labels unless "
            "every token trains)."
        },
    )
    chat_template_path: str | None = _option(
        None,
        "A .jinja file, or a tokenizer folder or Hub id, whose chat template replaces the "
        "tokenizer's before the data is rendered.",
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={
            "help": "As in TrainingArguments, but batches rows of similar length by default "
            "(less padding); packing and padding_free switch to 'random'.",
            "choices": ["random", "sequential", "group_by_length", "batch_rebalance"],
        },
    )

    def __post_init__(self) -> None:
        if self.max_seq_length is not None:
            self.max_length = self.max_seq_length
        self.max_seq_length = self.max_length
        if self.eval_packing is None:
            self.eval_packing = self.packing
        if self.loss_type == "chunked_nll":
            self.loss_type = "nll"
        for name, allowed in (
            ("loss_type", ("nll", "dft")),
            ("packing_strategy", ("bfd", "bfd_split", "wrapped")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"SFTConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if self.loss_chunk_size <= 0:
            raise ValueError(f"SFTConfig.loss_chunk_size must be > 0, got {self.loss_chunk_size}")
        if (
            self.activation_checkpointing_kwargs is None
            and self.gradient_checkpointing_kwargs is None
        ):
            # Reentrant checkpointing breaks with frozen inputs (LoRA) and is deprecated in torch.
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        _resolve_precision(self)
        on_cpu = self.use_cpu or not torch.cuda.is_available()
        if on_cpu and self.dataloader_num_workers > 0:
            # On CPU every worker process competes with the training threads for the same cores,
            # and collating pre-tokenized rows costs microseconds: workers only slow training.
            log.info(
                "dataloader_num_workers=%d -> 0: on CPU, workers take cores from training",
                self.dataloader_num_workers,
            )
            self.dataloader_num_workers = 0
        super().__post_init__()

    @classmethod
    def from_training_args(cls, args: TrainingArguments, **overrides: Any) -> SFTConfig:
        """Convert a plain `TrainingArguments` (what the seed's users pass) into an `SFTConfig`."""
        if isinstance(args, SFTConfig) and not overrides:
            return args
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        if values.get("train_sampling_strategy") == "random":
            # TrainingArguments' default, not a choice: keep SFT's length grouping.
            del values["train_sampling_strategy"]
        values.update(overrides)
        return cls(**values)


def _resolve_precision(cfg: TrainingArguments) -> None:
    """Replace a precision request this device cannot honour (rules in `sft_pipeline.model.device`).

    This runs before `TrainingArguments.__post_init__`, which refuses fp16 on a CPU.
    """
    cuda = torch.cuda.is_available() and not cfg.use_cpu
    requested = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"
    precision = resolve_precision(requested, cuda=cuda)
    cfg.bf16, cfg.fp16 = precision == "bf16", precision == "fp16"
    if not cuda and requested != "fp32":
        cfg.use_cpu = True
