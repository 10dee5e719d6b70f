"""Turn what users pass as `train_dataset` into rows of `input_ids` + `labels`.

Pre-tokenized data (the pipeline's `train_tokens`) is used as it is, apart from truncation. Raw
datasets in any format of the data half go through the pipeline's own code (records ->
templating -> tokenization), so the trainer and `kedro run` build identical labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from datasets import Dataset

from sft_pipeline.labels import IGNORE_INDEX
from sft_pipeline.trainer.packing import pack_rows
from sft_pipeline.trainer.sft_config import SFTConfig

log = logging.getLogger(__name__)

# No real limit: truncation to `max_length` happens here, after tokenization.
_NO_LIMIT = 2**31 - 1


def prepare_dataset(
    dataset: Dataset,
    tokenizer,
    args: SFTConfig,
    formatting_func: Callable[[dict[str, Any]], str] | None,
    name: str,
    packing: bool,
) -> Dataset:
    """Tokenized (and optionally packed) rows with columns `input_ids`, `labels` (+ lengths)."""
    if "input_ids" in dataset.column_names:
        ids, labels = _pretokenized_columns(dataset, args)
    else:
        ids, labels = _tokenize_raw(dataset, tokenizer, args, formatting_func, name)
    ids, labels = _truncate_and_check(ids, labels, args.max_length, name)
    if packing:
        capacity = args.max_length or max(len(row) for row in ids)
        packed = pack_rows(ids, labels, capacity)
        log.info(
            "%s: packed %d rows into %d rows of up to %d tokens (%.1f%% filled)",
            name,
            len(ids),
            len(packed["input_ids"]),
            capacity,
            100.0 * sum(map(len, ids)) / (capacity * max(len(packed["input_ids"]), 1)),
        )
        return Dataset.from_dict(packed)
    return Dataset.from_dict(
        {"input_ids": ids, "labels": labels, args.length_column_name: [len(r) for r in ids]}
    )


def _pretokenized_columns(dataset: Dataset, args: SFTConfig) -> tuple[list, list]:
    ids = dataset["input_ids"]
    if "labels" in dataset.column_names and args.completion_only_loss is not False:
        labels = dataset["labels"]
    else:
        labels = [list(row) for row in ids]
    return [list(r) for r in ids], [list(r) for r in labels]


def _tokenize_raw(
    dataset: Dataset,
    tokenizer,
    args: SFTConfig,
    formatting_func: Callable[[dict[str, Any]], str] | None,
    name: str,
) -> tuple[list, list]:
    from sft_pipeline.config import TemplateConfig, TokenizationConfig
    from sft_pipeline.records import content_id, to_canonical
    from sft_pipeline.templating import render_messages, render_text
    from sft_pipeline.tokenization import tokenize_texts

    template = TemplateConfig()
    schema, columns = _schema_for(dataset.column_names, args.dataset_text_field, name)
    rows = []
    for index, row in enumerate(dataset):
        try:
            if formatting_func is not None:
                messages, text = [], formatting_func(row)
                rendered = render_text(text, tokenizer, template)
            else:
                _fmt, messages, text = to_canonical(row, schema, columns)
                rendered = (
                    render_messages(messages, tokenizer, template)
                    if messages
                    else render_text(text, tokenizer, template)
                )
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(
                f"{name} row {index + 1}: cannot turn it into a {schema} conversation: {exc}"
            ) from exc
        rows.append({"record_id": f"{index}:{content_id(messages, text)}", **rendered})
    tokens, rejected = tokenize_texts(
        rows, tokenizer, TokenizationConfig(max_seq_length=args.max_length or _NO_LIMIT)
    )
    if rejected:
        examples = ", ".join(f"row {int(r['record_id'].split(':')[0]) + 1}" for r in rejected[:5])
        log.warning(
            "%s: %d of %d rows have no supervised token and are not trained on (%s%s); reasons: %s",
            name,
            len(rejected),
            len(rows),
            examples,
            ", ..." if len(rejected) > 5 else "",
            sorted({r["reason"] for r in rejected}),
        )
    ids = tokens["input_ids"]
    labels = ids if args.completion_only_loss is False else tokens["labels"]
    return ids, [list(r) for r in labels]


def _schema_for(column_names: list[str], text_field: str, name: str) -> tuple[str, dict[str, str]]:
    """The records schema of a raw dataset, honouring `dataset_text_field` for plain text."""
    from sft_pipeline.records import detect_schema

    try:
        schema = detect_schema(column_names)
    except ValueError:
        if text_field in column_names:
            return "text", {"text": text_field}
        raise ValueError(
            f"{name}: columns {sorted(column_names)} match no known format and there is no "
            f"`{text_field}` column (dataset_text_field); expected prompt/response (or "
            "completion), Alpaca instruction/input/output, messages, conversations, or a text "
            "column"
        ) from None
    if schema != "text" and text_field in column_names:
        # The seed passes dataset_text_field="prompt" on prompt/response data: training on the
        # prompt column alone would be language modelling on questions, never what was meant.
        log.warning(
            "%s: dataset_text_field=%r is ignored: the dataset has %s columns, so it is trained "
            "as %s with loss on the responses only",
            name,
            text_field,
            schema,
            schema,
        )
    return schema, {}


def _truncate_and_check(
    ids: list[list[int]], labels: list[list[int]], max_length: int | None, name: str
) -> tuple[list, list]:
    """Keep each row's start up to `max_length`; drop (loudly) rows with nothing to learn."""
    kept_ids, kept_labels, empty, truncated = [], [], [], 0
    for index, (row_ids, row_labels) in enumerate(zip(ids, labels, strict=True)):
        if len(row_ids) != len(row_labels):
            raise ValueError(
                f"{name} row {index + 1}: input_ids has {len(row_ids)} tokens but labels has "
                f"{len(row_labels)}; expected equal lengths"
            )
        if max_length is not None and len(row_ids) > max_length:
            row_ids, row_labels = row_ids[:max_length], row_labels[:max_length]
            truncated += 1
        # Position 0 is never predicted (nothing precedes it), so it does not count.
        supervised = [i for i, label in enumerate(row_labels) if label != IGNORE_INDEX and i > 0]
        if not supervised:
            empty.append(index + 1)
            continue
        # Tokens after the last supervised one (a template's newline after <|im_end|>) predict
        # nothing that is trained: dropping them saves compute and matches TRL's rows.
        row_ids, row_labels = row_ids[: supervised[-1] + 1], row_labels[: supervised[-1] + 1]
        kept_ids.append(row_ids)
        kept_labels.append(row_labels)
    if truncated:
        log.warning("%s: truncated %d rows to max_length=%d tokens", name, truncated, max_length)
    if empty:
        log.warning(
            "%s: %d rows have no supervised token (after truncation) and are not trained on: "
            "rows %s%s",
            name,
            len(empty),
            empty[:10],
            " ..." if len(empty) > 10 else "",
        )
    if not kept_ids:
        raise ValueError(f"{name}: no row has a supervised token; nothing to train on")
    return kept_ids, kept_labels
