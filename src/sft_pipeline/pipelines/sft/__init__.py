"""The `sft` pipeline: raw instruction data to a merged, evaluated fine-tune."""

from sft_pipeline.pipelines.sft.pipeline import create_pipeline

__all__ = ["create_pipeline"]
