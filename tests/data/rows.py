"""Records, splits and rendered rows in memory for tests, through the pipeline's own streaming
code: each helper is a thin wrapper that reads back what the node would write."""

from __future__ import annotations

from typing import Any

import pandas as pd

from sft_pipeline.common.config import DataConfig, TemplateConfig
from sft_pipeline.data.ingestion import ingest_to_parquet
from sft_pipeline.data.rendering import render_stream
from sft_pipeline.data.splitting import split_stream
from sft_pipeline.data.templating import Renderer
from sft_pipeline.data.validation import validate_stream


def render_messages(messages: list[dict[str, Any]], tokenizer, cfg: TemplateConfig) -> dict:
    """One conversation's row."""
    return Renderer(tokenizer, cfg).row(messages)


def render_text(text: str, tokenizer, cfg: TemplateConfig) -> dict:
    """One plain-text (language-modelling) record's row: all of it supervised, then EOS."""
    return Renderer(tokenizer, cfg).row([], text)


def render_records(records, tokenizer, cfg: TemplateConfig) -> list[dict]:
    """Every canonical record of a DataFrame, rendered as the pipeline's node renders them."""
    return list(render_stream(records, tokenizer, cfg))


def validate(records, cfg) -> tuple:
    """(valid records DataFrame, rejected rows, counts report) of canonical records, validated
    as the pipeline's node validates them."""
    valid, rejected, report = validate_stream(records, cfg)
    return valid.to_pandas(), list(rejected), report


def ingest(cfg: DataConfig) -> pd.DataFrame:
    """Every file of `cfg.path` as canonical records, in path and row order, as the pipeline's
    node ingests them."""
    return ingest_to_parquet(cfg).to_pandas()


def split(valid, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, eval) records of valid records, split as the pipeline's node splits them."""
    train, evaluation = split_stream(valid, cfg)
    return train.to_pandas(), evaluation.to_pandas()
