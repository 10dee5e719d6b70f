"""`SFTConfig`: `transformers.TrainingArguments` plus the fields supervised fine-tuning needs.

Precision is resolved here, once, so every code path (our trainer, the Kedro node, a user's
script) sees the same decision: a requested precision that cannot run on this device is replaced
by the best one that can, with one warning.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

log = logging.getLogger(__name__)


@dataclass
class SFTConfig(TrainingArguments):
    """Training arguments for `SFTTrainer`; every `TrainingArguments` field is accepted too."""

    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Truncate tokenized rows to this many tokens; the bin size when packing."
        },
    )
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Alias of `max_length` (the older TRL name)."}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Best-fit-decreasing packing of rows into `max_length` bins, kept apart."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Without packing: re-pack each batch's rows into rows of at most "
            "`max_length` tokens, kept apart like packed ones. Same rows per step (same loss), "
            "no compute on padding; random batches then cost no more than length-grouped ones."
        },
    )
    eval_packing: bool | None = field(
        default=None, metadata={"help": "Pack the eval set too; defaults to `packing`."}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad each batch's length up to a multiple of this."}
    )
    dataset_text_field: str = field(
        default="text", metadata={"help": "Column with plain text for language-modelling data."}
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Train only on completions/assistant turns. None: yes for prompt-completion "
            "and conversational data, no for plain text. False trains on every token."
        },
    )
    loss_chunk_size: int = field(
        default=512,
        metadata={
            "help": "Supervised tokens per LM-head + cross-entropy chunk (bounds logit memory)."
        },
    )
    max_tokens_per_forward: int = field(
        default=0,
        metadata={
            "help": "Run each batch through forward+backward in row slices of at most this many "
            "tokens (same gradients: every slice's loss is normalized by the step's supervised "
            "tokens). Bounds activation memory at some speed cost (on a 2-core CPU, 4x512 "
            "packed tokens took 57 s whole, 94 s in 2 slices, 176 s in 4). 0: never slice."
        },
    )
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when `model` is a path."},
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
    """Replace a precision request this device cannot honour with the fastest one it can."""
    on_cuda = torch.cuda.is_available() and not cfg.use_cpu
    if on_cuda:
        if cfg.bf16 and not torch.cuda.is_bf16_supported():
            _warn_once("bf16 requested but this GPU does not support it; using fp16 instead")
            cfg.bf16, cfg.fp16 = False, True
        return
    if cfg.bf16:
        # bf16 autocast always runs on CPU; it is only slow without native bf16 instructions.
        if not cpu_bf16_is_faster():
            _warn_once("bf16 autocast is slower than fp32 on this CPU (measured); fp32 is faster")
        cfg.use_cpu = True
        return
    if cfg.fp16:
        use_bf16 = cpu_bf16_is_faster()
        _warn_once(
            "fp16 was requested but cannot run on a CPU; training in "
            f"{'bf16 autocast' if use_bf16 else 'fp32'} instead (the faster one here, measured)"
        )
        cfg.fp16, cfg.bf16, cfg.use_cpu = False, use_bf16, True


@functools.lru_cache(maxsize=1)
def cpu_bf16_is_faster() -> bool:
    """Measure, once per process, whether a bf16 matmul beats fp32 on this CPU.

    Only CPUs with native bf16 instructions (AVX512-BF16, AMX) can win; without them bf16 is
    emulated (an AVX2 EPYC here: 0.9 GFLOP/s in bf16 against 137 in fp32), so those are ruled
    out by their flags rather than by a timing that a busy machine could skew. On the others a
    ~0.1 s measurement decides, since how much bf16 gains depends on the chip.
    """
    if not torch.backends.mkldnn.is_available() or not _cpu_has_native_bf16():
        return False
    x = torch.randn(256, 512)
    weight = torch.randn(512, 512)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, w = x.to(dtype), weight.to(dtype)
        torch.nn.functional.linear(a, w)  # warm-up: the first call pays for kernel selection
        start = time.perf_counter()
        for _ in range(3):
            torch.nn.functional.linear(a, w)
        timings[dtype] = (time.perf_counter() - start) / 3
    faster = timings[torch.bfloat16] < 0.9 * timings[torch.float32]
    log.info(
        "CPU linear 256x512x512: fp32 %.2f ms, bf16 %.2f ms -> %s",
        timings[torch.float32] * 1e3,
        timings[torch.bfloat16] * 1e3,
        "bf16" if faster else "fp32",
    )
    return faster


def _cpu_has_native_bf16() -> bool:
    # torch.cpu's probes are private; a torch without them gets the measurement instead.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    present = [getattr(torch.cpu, name) for name in probes if hasattr(torch.cpu, name)]
    return not present or any(probe() for probe in present)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)
        log.warning(message)
