"""Thin node functions: parse the parameter sections, call the library, return artifacts.

The work lives in modules that do not import Kedro (docs/architecture.md); each node here only
turns Kedro's inputs into typed config and library calls.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sft_pipeline.common import config as C

log = logging.getLogger(__name__)


# `path` is a str or a list of str (DataConfig checks it): a union annotation here would make
# Kedro's typed-parameter check warn that it cannot validate unions, on every run.
# The data half streams: each node returns lazy handles on spooled files (sft_pipeline.data.streams)
# that the catalog's datasets move into place, never whole tables.
def ingest_records(
    path: Any,
    schema: str,
    columns: dict[str, str],
    split: str = "train",
    subset: Any = None,  # str or None (DataConfig checks it; no union for Kedro)
    chunk_rows: int = 10_000,
    images: Any = "auto",  # str or list of str
    reasoning_tags: Any = ("<think>", "</think>"),  # two strings (DataConfig checks them)
    sources: Any = None,  # list of source sections (DataConfig checks them)
):
    from sft_pipeline.data.ingestion import ingest_to_parquet

    data = {"path": path, "schema": schema, "columns": columns}
    data |= {"split": split, "subset": subset, "chunk_rows": chunk_rows, "images": images}
    data |= {"reasoning_tags": reasoning_tags, "sources": sources or []}
    records = ingest_to_parquet(C.parse_section(C.DataConfig, data, "data"))
    log.info("ingested %d records", len(records))
    return records


def validate_records(
    records, validation: dict[str, Any], reasoning_tags: Any = ("<think>", "</think>")
):
    from sft_pipeline.data.validation import validate_stream

    cfg = C.parse_section(C.ValidationConfig, validation, "validation")
    tags = C.parse_section(C.DataConfig, {"reasoning_tags": reasoning_tags}, "data").reasoning_tags
    return validate_stream(records, cfg, tags)


def split_records(
    valid_records,
    validation_report: dict[str, Any],
    eval_fraction: float,
    seed: int,
    max_rejected_fraction: float,
    sources: Any = None,  # list of source sections (DataConfig checks them)
    mixture_rows: Any = None,  # int or None
):
    from sft_pipeline.data.mixture import mix_stream
    from sft_pipeline.data.splitting import split_stream
    from sft_pipeline.data.validation import check_rejected_fraction
    from sft_pipeline.run.hooks import artifact_path

    # The gate runs here, after validate_records has saved the rejects, so the error can point
    # at a file that exists.
    check_rejected_fraction(
        validation_report,
        C.parse_section(
            C.ValidationConfig, {"max_rejected_fraction": max_rejected_fraction}, "validation"
        ),
        artifact_path("rejected_records"),
    )
    data = {"eval_fraction": eval_fraction, "seed": seed}
    data |= {"sources": sources or [], "mixture_rows": mixture_rows}
    cfg = C.parse_section(C.DataConfig, data, "data")
    train, evaluation = split_stream(valid_records, cfg)
    if cfg.sources:
        train, _counts = mix_stream(train, cfg)
    return train, evaluation


def prepare_base_model(model: dict[str, Any]):
    from sft_pipeline.model.base_model import prepare_base_model as prepare

    return prepare(C.parse_section(C.ModelConfig, model, "model"))


def render_conversations(
    train_records,
    eval_records,
    base_model: Path,
    template: dict[str, Any],
    roles_to_train: Any = ("assistant",),  # a list of roles (TrainingConfig checks it)
):
    from sft_pipeline.data.rendering import render_stream
    from sft_pipeline.model.loading import load_tokenizer_or_processor

    cfg = C.parse_section(C.TemplateConfig, template, "template")
    # Rendering decides which text is supervised, so it reads the roles that train.
    roles = C.parse_section(
        C.TrainingConfig, {"roles_to_train": roles_to_train}, "training"
    ).roles_to_train
    tokenizer, _processor = load_tokenizer_or_processor(base_model)
    return (
        render_stream(train_records, tokenizer, cfg, "train_texts", roles),
        render_stream(eval_records, tokenizer, cfg, "eval_texts", roles),
    )


def tokenize_conversations(train_texts, eval_texts, base_model: Path, tokenization: dict[str, Any]):
    from sft_pipeline.data.token_files import tokenize_stream
    from sft_pipeline.data.tokenization import summarize_token_stats
    from sft_pipeline.model.loading import load_tokenizer_or_processor

    cfg = C.parse_section(C.TokenizationConfig, tokenization, "tokenization")
    tokenizer, processor = load_tokenizer_or_processor(base_model)
    train_tokens, train_rejected = tokenize_stream(
        train_texts, tokenizer, cfg, "train_tokens", processor
    )
    # Turn weights shape the training objective only: held-out rows are scored at weight 1, so
    # runs with other weights, and the base model, compare on the same loss.
    eval_tokens, eval_rejected = tokenize_stream(
        eval_texts, tokenizer, cfg, "eval_tokens", processor, turn_weights=False
    )
    stats = summarize_token_stats(
        {
            "train": (train_texts, train_tokens, train_rejected),
            "eval": (eval_texts, eval_tokens, eval_rejected),
        },
        cfg,
    )
    return train_tokens, eval_tokens, stats


def train_adapter(
    base_model: Path,
    train_tokens,
    eval_tokens,
    quantization: dict[str, Any],
    lora: dict[str, Any],
    training: dict[str, Any],
    max_seq_length: int,
):
    from sft_pipeline.finetune.job import TrainJob
    from sft_pipeline.finetune.workflow import train

    job = TrainJob(
        base_model_dir=Path(base_model),
        train_tokens=train_tokens,
        eval_tokens=eval_tokens,
        quantization=C.parse_section(C.QuantizationConfig, quantization, "quantization"),
        lora=C.parse_section(C.LoraConfig, lora, "lora"),
        training=C.parse_section(C.TrainingConfig, training, "training"),
        # Packing fills bins up to the tokenization length, not just the longest row.
        max_length=C.parse_section(
            C.TokenizationConfig, {"max_seq_length": max_seq_length}, "tokenization"
        ).max_seq_length,
    )
    return train(job)


def merge_adapter(
    base_model: Path,
    adapter: Path,
    data_path: Any,
    data_schema: str,
    data_columns: dict[str, str],
    eval_fraction: float,
    seed: int,
    template: dict[str, Any],
    training_summary: dict[str, Any],
    merge_base_model: Any = None,  # str or None (MergeConfig checks it; no union for Kedro)
):
    from sft_pipeline.export.merge import merge

    # Only the data keys the model card describes: chunk sizes and the like change no byte.
    data = {"path": data_path, "schema": data_schema, "columns": data_columns}
    data |= {"eval_fraction": eval_fraction, "seed": seed}
    return merge(
        base_model,
        adapter,
        C.parse_section(C.DataConfig, data, "data"),
        training_summary,
        C.parse_section(C.TemplateConfig, template, "template"),
        C.parse_section(C.MergeConfig, {"base_model": merge_base_model}, "merge").base_model,
    )


def evaluate_model(
    base_model: Path,
    merged_model: Path,
    eval_texts: list[dict[str, Any]],
    eval_tokens,
    training_history: list[dict[str, Any]],
    token_stats: dict[str, Any],
    evaluation: dict[str, Any],
    training_summary: Any = None,  # dicts; no union annotation for Kedro's parameter check
    quantization: Any = None,
    template: Any = None,
    reasoning_tags: Any = ("<think>", "</think>"),  # two strings (DataConfig checks them)
):
    from sft_pipeline.evaluation.benchmarks import check_regression, prepare_suite
    from sft_pipeline.evaluation.evaluate import evaluate

    cfg = C.parse_section(C.EvaluationConfig, evaluation, "evaluation")
    # Benchmark task names and datasets are checked before any model is loaded.
    suite = prepare_suite(
        cfg.benchmarks, base_model, C.parse_section(C.TemplateConfig, template, "template")
    )

    # The base is evaluated as training held it: in 4-bit after QLoRA (on CUDA).
    qlora = (training_summary or {}).get("method") == "qlora"
    base_quantization = (
        C.parse_section(C.QuantizationConfig, quantization, "quantization").model_copy(
            update={"load_in_4bit": True}
        )
        if qlora
        else None
    )
    metrics, generations, plots = evaluate(
        base_model,
        merged_model,
        eval_texts,
        eval_tokens,
        training_history,
        token_stats,
        cfg,
        base_quantization,
        suite,
        C.parse_section(C.DataConfig, {"reasoning_tags": reasoning_tags}, "data").reasoning_tags,
    )
    check_regression(metrics, cfg.max_regression)
    return metrics, generations, plots


def report_run(*reports: Any) -> str:
    """metrics, training_history, training_summary, token_stats, validation_report,
    eval_generations, train_texts and eval_texts (the pipeline's order; the texts are read only
    for a mixture, to count rows per source) -> the report page."""
    from sft_pipeline.evaluation.report import render_report

    return render_report(*reports)


def export_model(merged_model: Path, export: dict[str, Any]):
    from sft_pipeline.export.gguf import export as plan_export

    return plan_export(merged_model, C.parse_section(C.ExportConfig, export, "export"))
