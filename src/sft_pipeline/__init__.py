"""sft-pipeline: reproducible supervised fine-tuning of causal language models."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["SFTConfig", "SFTTrainer"]

if TYPE_CHECKING:
    from sft_pipeline.trainer import SFTConfig, SFTTrainer


def __getattr__(name: str):
    # Lazy: `import sft_pipeline` (done by Kedro at start-up) must not pay for torch/transformers.
    if name in __all__:
        from sft_pipeline import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'sft_pipeline' has no attribute {name!r}")
