"""Project pipelines."""

from kedro.pipeline import Pipeline

from sft_pipeline.pipelines import sft


def register_pipelines() -> dict[str, Pipeline]:
    sft_pipeline = sft.create_pipeline()
    return {"sft": sft_pipeline, "__default__": sft_pipeline}
