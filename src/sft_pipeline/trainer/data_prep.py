"""Turn what users pass as `train_dataset` into rows of `input_ids` + `labels`.

The dataset's type is read from its columns (and its first row), with the semantics TRL's
`SFTTrainer` documents for the same types:

- language modelling: a `text` column (`dataset_text_field`), or any columns with a
  `formatting_func`; every token is supervised (text + EOS);
- prompt-completion: `prompt` and `completion` strings; the completion + EOS, no chat template;
- conversational prompt-completion: `prompt` and `completion` message lists; the completion's
  assistant turns;
- conversational: `messages` (or ShareGPT `conversations`); every assistant turn, with a `tools`
  column (function schemas, or their JSON string) handed to the chat template as `tools=`;
- the pipeline's records: `prompt`/`response`, Alpaca `instruction`/`input`/`output`; the response;
- pre-tokenized: `input_ids` (+ `labels`, `completion_mask` or `assistant_masks`); as given,
  with an optional `loss_weights` column (a finite weight >= 0 per token, aligned with the labels:
  the loss multiplies each token's NLL by it), kept through truncation and packing.

Strings are joined as they are (BOS when the model uses one + prompt + completion + EOS), so base
models need no chat template. Conversations and the pipeline's records go through the pipeline's
own templating and tokenization code with `template.chat_template: auto` (the tokenizer's chat
template, or the plain layout for a base model), so the trainer and `kedro run` build identical
labels. Every label comes from the same character-offset rule (`sft_pipeline.data.tokenization`).

`completion_only_loss=False` trains on every token of prompt-completion data (and of the
pipeline's records), `assistant_only_loss=False` on every token of a conversation.

Where this differs from TRL 1.16, on purpose:
- a conversation's assistant turns are supervised by default (TRL: only with
  `assistant_only_loss=True` and a template with generation markers), and a template's text
  after the end-of-turn token (ChatML's newline after `<|im_end|>`) is never supervised; rendered
  rows end at their last supervised token (pre-tokenized rows keep all their tokens, as TRL);
- a `completion_mask` column is used unless `completion_only_loss=False` (TRL 1.16 uses it only
  with `completion_only_loss=True`);
- a conversation for a tokenizer without a chat template gets the plain layout (TRL fails);
- agent data (`tools` + `tool_calls` + `tool` messages) renders to TRL's `input_ids`, but only
  the assistant's calls and replies (with their end-of-turn tokens) are supervised; TRL trains
  on every token by default, tool results and tool schemas included, and with
  `assistant_only_loss=True` needs a template with generation markers;
- tool-call arguments given as JSON strings are parsed into objects before templating, as
  chat templates expect (TRL passes the string through, and templates such as Qwen2.5's then
  write it quoted);
- `formatting_func` may also take a batch and return a list of strings (older TRL).

An `IterableDataset` (streaming) is prepared lazily, chunk by chunk (packing within a chunk); the
trainer then needs `max_steps`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from datasets import Dataset, IterableDataset

from sft_pipeline.common.labels import IGNORE_INDEX, LOSS_WEIGHTS
from sft_pipeline.data.turns import is_messages
from sft_pipeline.trainer.formatting import Formatter
from sft_pipeline.trainer.packing import pack_by_strategy
from sft_pipeline.trainer.sft_config import SFTConfig

log = logging.getLogger(__name__)

# No real limit: truncation to `max_length` happens here, after tokenization.
_NO_LIMIT = 2**31 - 1
# Rows per chunk of a streamed dataset (tokenized together, packed together).
STREAM_CHUNK = 1000

PRETOKENIZED = "pretokenized"
LANGUAGE_MODELLING = "language modelling"
PROMPT_COMPLETION = "prompt-completion"
CONVERSATIONAL_PROMPT_COMPLETION = "conversational prompt-completion"
CONVERSATIONAL = "conversational"
RECORDS = "records"


def prepare_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer,
    args: SFTConfig,
    formatting_func: Callable[[Any], str | list[str]] | None,
    name: str,
    packing: bool,
) -> Dataset | IterableDataset:
    """Tokenized (and optionally packed) rows with columns `input_ids`, `labels` (+ lengths)."""
    from sft_pipeline.trainer import vision

    if not isinstance(dataset, IterableDataset) and vision.is_vision_dataset(dataset.column_names):
        return vision.prepare_vision_dataset(dataset, tokenizer, args, name, packing)
    if isinstance(dataset, IterableDataset):
        return _prepare_stream(dataset, tokenizer, args, formatting_func, name, packing)
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty")
    encoder = RowEncoder(tokenizer, args, formatting_func, name, dataset.column_names, dataset[0])
    ids, labels, weights = _truncate_and_check(
        *encoder.encode(dataset), _row_limit(args, packing), name, trim=_trims(args, encoder.kind)
    )
    if packing:
        capacity = args.max_length or max(len(row) for row in ids)
        packed = pack_by_strategy(ids, labels, capacity, args.packing_strategy, weights)
        log.info(
            "%s: packed %d rows into %d rows of up to %d tokens (%.1f%% filled)",
            name,
            len(ids),
            len(packed["input_ids"]),
            capacity,
            100.0 * sum(map(len, ids)) / (capacity * max(len(packed["input_ids"]), 1)),
        )
        return Dataset.from_dict(packed)
    return Dataset.from_dict(_columns(ids, labels, args, packing=False, weights=weights))


def _trims(args: SFTConfig, kind: str) -> bool:
    """Whether rows end at their last supervised token (`trim_unsupervised_tail`)."""
    if args.trim_unsupervised_tail is None:
        return kind != PRETOKENIZED
    return bool(args.trim_unsupervised_tail)


def _row_limit(args: SFTConfig, packing: bool) -> int | None:
    """Where rows are truncated: 'bfd_split' and 'wrapped' packing keep every token."""
    if packing and args.packing_strategy != "bfd":
        return None
    return args.max_length


def _columns(ids: list, labels: list, args: SFTConfig, packing: bool, weights=None) -> dict:
    if packing:
        if not ids:
            return _empty_packed(weights)
        packed = pack_by_strategy(ids, labels, args.max_length, args.packing_strategy, weights)
        # Every chunk of a stream has the same columns, whichever strategy packed it.
        packed.setdefault("seq_lengths", [[len(row)] for row in packed["input_ids"]])
        return packed
    columns = {"input_ids": ids, "labels": labels, args.length_column_name: [len(r) for r in ids]}
    return columns if weights is None else {**columns, LOSS_WEIGHTS: weights}


def _empty_packed(weights=None) -> dict[str, list]:
    return {
        "input_ids": [],
        "labels": [],
        "seq_lengths": [],
        **({} if weights is None else {LOSS_WEIGHTS: []}),
    }


def _prepare_stream(
    dataset: IterableDataset,
    tokenizer,
    args: SFTConfig,
    formatting_func,
    name: str,
    packing: bool,
) -> IterableDataset:
    if packing and not args.max_length:
        raise ValueError(f"{name}: packing a streamed dataset needs max_length (the bin size)")
    try:
        first = next(iter(dataset))
    except StopIteration:
        raise ValueError(f"{name} is empty") from None
    columns = list(dataset.column_names or first)
    encoder = RowEncoder(tokenizer, args, formatting_func, name, columns, first)

    def encode_chunk(batch: dict[str, list]) -> dict[str, list]:
        rows = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        ids, labels, weights = _truncate_and_check(
            *encoder.encode(rows),
            _row_limit(args, packing),
            name,
            streaming=True,
            trim=_trims(args, encoder.kind),
        )
        return _columns(ids, labels, args, packing, weights)

    log.info(
        "%s: streamed; tokenized%s in chunks of %d rows",
        name,
        " and packed" * packing,
        STREAM_CHUNK,
    )
    return dataset.map(encode_chunk, batched=True, batch_size=STREAM_CHUNK, remove_columns=columns)


def dataset_type(columns: Iterable[str], first: dict[str, Any], formatting_func) -> str:
    """Which of the types in the module doc a dataset with these columns and first row is."""
    columns = set(columns)
    if "input_ids" in columns:
        return PRETOKENIZED
    if formatting_func is not None:
        return LANGUAGE_MODELLING
    if {"prompt", "completion"} <= columns:
        if is_messages(first["prompt"]) and is_messages(first["completion"]):
            return CONVERSATIONAL_PROMPT_COMPLETION
        if isinstance(first["prompt"], str) and isinstance(first["completion"], str):
            return PROMPT_COMPLETION
    return RECORDS  # refined by the records schema in RowEncoder


class RowEncoder:
    """Encodes rows of one dataset (whose type is fixed by its first row) into ids and labels."""

    def __init__(self, tokenizer, args: SFTConfig, formatting_func, name, columns, first):
        from sft_pipeline.common.config import TemplateConfig
        from sft_pipeline.trainer.rendering import RowRenderer

        self.tokenizer, self.args, self.name = tokenizer, args, name
        self.kind = dataset_type(columns, first, formatting_func)
        self.schema, self.columns = "", {}
        if self.kind == RECORDS:
            self.schema, self.columns = _schema_for(list(columns), args.dataset_text_field, name)
            self.kind = {"text": LANGUAGE_MODELLING, "messages": CONVERSATIONAL}.get(
                self.schema, CONVERSATIONAL if self.schema == "sharegpt" else RECORDS
            )
        if self.kind == PRETOKENIZED and formatting_func is not None:
            log.warning("%s is already tokenized (input_ids): formatting_func is ignored", name)
        self._format = Formatter(formatting_func, first) if formatting_func else None
        # Pre-tokenized rows are never rendered (and may come with a minimal tokenizer).
        self.renderer = (
            None if self.kind == PRETOKENIZED else RowRenderer(tokenizer, TemplateConfig())
        )
        self.every_token = self._trains_every_token()
        log.info(
            "%s: %s data%s; loss on %s",
            name,
            self.kind,
            f" ({self.schema})" if self.schema and self.kind != LANGUAGE_MODELLING else "",
            "every token" if self.every_token else "the completions / assistant turns",
        )

    def _trains_every_token(self) -> bool:
        args, kind = self.args, self.kind
        assistant_only = getattr(args, "assistant_only_loss", None)
        if assistant_only and kind in (LANGUAGE_MODELLING, PROMPT_COMPLETION):
            raise ValueError(
                f"{self.name}: assistant_only_loss=True needs conversational data (messages, or "
                f"prompt/completion as message lists); this dataset is {kind}"
            )
        if kind == LANGUAGE_MODELLING:
            if args.completion_only_loss:
                raise ValueError(
                    f"{self.name}: completion_only_loss=True needs prompt-completion data; "
                    "language-modelling data (a text column or formatting_func) has no completion"
                )
            return True
        if kind == CONVERSATIONAL:
            return assistant_only is False or args.completion_only_loss is False
        return args.completion_only_loss is False

    def encode(self, rows: Iterable[dict[str, Any]]) -> tuple[list, list, list | None]:
        """(ids, labels, loss weights or None) of each row."""
        if self.kind == PRETOKENIZED:
            return self._pretokenized(rows)
        return (*self._tokenize(rows), None)

    def _pretokenized(self, rows: Iterable[dict[str, Any]]) -> tuple[list, list, list | None]:
        args = self.args
        ids_out, labels_out, weights_out = [], [], []
        for index, row in enumerate(rows):
            ids = list(row["input_ids"])
            if row.get("labels") is not None and args.completion_only_loss is not False:
                labels = list(row["labels"])
            else:
                masks = []
                if (
                    row.get("completion_mask") is not None
                    and args.completion_only_loss is not False
                ):
                    masks.append(row["completion_mask"])
                if row.get("assistant_masks") is not None and args.assistant_only_loss is not False:
                    masks.append(row["assistant_masks"])
                labels = [
                    token if all(bits) else IGNORE_INDEX
                    for token, *bits in zip(ids, *masks, strict=True)
                ]
            ids_out.append(ids)
            labels_out.append(labels)
            if LOSS_WEIGHTS in row:
                weights_out.append(_checked_weights(row[LOSS_WEIGHTS], len(ids), self.name, index))
        return ids_out, labels_out, weights_out if weights_out else None

    def _tokenize(self, rows: Iterable[dict[str, Any]]) -> tuple[list, list]:
        from sft_pipeline.common.config import TokenizationConfig
        from sft_pipeline.data.tokenization import tokenize_texts

        rows = list(rows)
        texts = self._format(rows) if self._format else None
        rendered = []
        for index, row in enumerate(rows):
            try:
                with self.renderer.row_kwargs(row, self.name, index):
                    segments = self._render(row, None if texts is None else texts[index])
            except (ValueError, TypeError, KeyError) as exc:
                what = f"a {self.schema} conversation" if self.schema else f"{self.kind} data"
                raise ValueError(
                    f"{self.name} row {index + 1}: cannot turn it into {what}: {exc}"
                ) from exc
            rendered.append({"record_id": str(index), **segments})
        tokens, rejected = tokenize_texts(
            rendered,
            self.tokenizer,
            TokenizationConfig(max_seq_length=_NO_LIMIT),
        )
        if rejected:
            examples = ", ".join(f"row {int(r['record_id']) + 1}" for r in rejected[:5])
            log.warning(
                "%s: %d of %d rows have no supervised token and are not trained on (%s%s); "
                "reasons: %s",
                self.name,
                len(rejected),
                len(rendered),
                examples,
                ", ..." if len(rejected) > 5 else "",
                sorted({r["reason"] for r in rejected}),
            )
        ids = [list(r) for r in tokens["input_ids"]]
        if self.every_token:
            return ids, [list(r) for r in ids]
        return ids, [list(r) for r in tokens["labels"]]

    def _render(self, row: dict[str, Any], text: str | None) -> dict[str, Any]:
        from sft_pipeline.data.records import (
            canonical_tools,
            loads_tools,
            normalize_turns,
            row_tools,
            to_canonical,
        )

        renderer = self.renderer
        if text is not None:
            return renderer.row([], text)
        if self.kind == PROMPT_COMPLETION:
            return renderer.prompt_completion_row(row["prompt"], row["completion"])
        # TRL's `tools` column (a list of function schemas, or its JSON string) and messages
        # with `tool_calls` / role `tool` take the pipeline's canonical form (records.py).
        if self.kind == CONVERSATIONAL_PROMPT_COMPLETION:
            prompt = normalize_turns(list(row["prompt"]))
            completion = normalize_turns(list(row["completion"]))
            tools = loads_tools(canonical_tools(row.get("tools")))
            return renderer.row(prompt + completion, supervise_from=len(prompt), tools=tools)
        _fmt, messages, text = to_canonical(row, self.schema, self.columns)
        tools = loads_tools(row_tools(row, self.schema, self.columns))
        return renderer.row(messages, text, tools=tools)


def _schema_for(column_names: list[str], text_field: str, name: str) -> tuple[str, dict[str, str]]:
    """The records schema of a raw dataset, honouring `dataset_text_field` for plain text."""
    from sft_pipeline.data.records import detect_schema

    try:
        schema = detect_schema(column_names)
    except ValueError:
        if text_field in column_names:
            return "text", {"text": text_field}
        raise ValueError(
            f"{name}: columns {sorted(column_names)} match no known format and there is no "
            f"`{text_field}` column (dataset_text_field); expected text, prompt/completion, "
            "messages, input_ids, prompt/response, Alpaca instruction/input/output or "
            "conversations"
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


def _checked_weights(values, n: int, name: str, index: int) -> list[float]:
    """A row's `loss_weights`: one finite number >= 0 per token, else an error naming it."""
    weights = [float(w) for w in values]
    bad = next((w for w in weights if not math.isfinite(w) or w < 0), None)
    if len(weights) != n or bad is not None:
        found = f"{len(weights)} values for {n} tokens" if len(weights) != n else f"{bad}"
        raise ValueError(
            f"{name} row {index + 1}: {LOSS_WEIGHTS} has {found}; expected one finite number "
            ">= 0 per token of input_ids"
        )
    return weights


def _truncate_and_check(
    ids: list[list[int]],
    labels: list[list[int]],
    weights: list[list[float]] | None,
    max_length: int | None,
    name: str,
    streaming: bool = False,
    trim: bool = True,
) -> tuple[list, list, list | None]:
    """Keep each row's start up to `max_length`; drop (loudly) rows with nothing to learn.

    `trim`: end rendered rows at their last supervised token. Pre-tokenized rows are the
    user's own tokens and keep them all (TRL stores them so too). `weights` (loss weights, or
    None) are cut and dropped with their rows.
    """
    kept_ids, kept_labels, kept_weights, empty, truncated = [], [], [], [], 0
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
        # nothing that is trained: dropping them saves compute.
        if trim:
            row_ids, row_labels = row_ids[: supervised[-1] + 1], row_labels[: supervised[-1] + 1]
        kept_ids.append(row_ids)
        kept_labels.append(row_labels)
        if weights is not None:
            kept_weights.append(weights[index][: len(row_ids)])
    # A stream reports per chunk, and row numbers restart in each: keep that out of the warnings.
    report = log.debug if streaming else log.warning
    if truncated:
        report("%s: truncated %d rows to max_length=%d tokens", name, truncated, max_length)
    if empty:
        report(
            "%s: %d rows have no supervised token (after truncation) and are not trained on: "
            "rows %s%s",
            name,
            len(empty),
            empty[:10],
            " ..." if len(empty) > 10 else "",
        )
    if not kept_ids and not streaming:
        raise ValueError(f"{name}: no row has a supervised token; nothing to train on")
    return kept_ids, kept_labels, None if weights is None else kept_weights
