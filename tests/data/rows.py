"""Rendered rows and validated records in memory for tests, through the pipeline's own code."""

from __future__ import annotations

from typing import Any

from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.data.rendering import render_stream
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
