"""The project's SFT trainer: TRL-like API, exact labels, packing without contamination.

The names below load on first use: a pipeline stage that needs only the collator or the loss
(evaluation, tokenization) does not pay for `transformers.TrainingArguments` and the trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sft_pipeline.trainer.collator import DataCollatorForSFT
    from sft_pipeline.trainer.packing import best_fit_decreasing, pack_rows
    from sft_pipeline.trainer.sft_config import SFTConfig
    from sft_pipeline.trainer.sft_trainer import SFTTrainer

_HOMES = {
    "DataCollatorForSFT": "collator",
    "SFTConfig": "sft_config",
    "SFTTrainer": "sft_trainer",
    "best_fit_decreasing": "packing",
    "pack_rows": "packing",
}
__all__ = ["DataCollatorForSFT", "SFTConfig", "SFTTrainer", "best_fit_decreasing", "pack_rows"]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
