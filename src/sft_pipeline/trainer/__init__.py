"""The project's SFT trainer: TRL-like API, exact labels, packing without contamination."""

from sft_pipeline.trainer.collator import DataCollatorForSFT
from sft_pipeline.trainer.packing import best_fit_decreasing, pack_rows
from sft_pipeline.trainer.sft_config import SFTConfig
from sft_pipeline.trainer.sft_trainer import SFTTrainer

__all__ = ["DataCollatorForSFT", "SFTConfig", "SFTTrainer", "best_fit_decreasing", "pack_rows"]
