"""Tokenize rendered rows into `input_ids`, `attention_mask` and `labels` (-100 = not supervised).

Each row's segments are joined into the exact model text and encoded (`sft_pipeline.data.encoding`:
ids and character offsets, a leading BOS split off, control-token text kept literal or not).
Labels come from character spans: a token is supervised when its first non-whitespace character
lies in a supervised segment (`sft_pipeline.data.token_anchors` says why that character).

`tokenization.special_tokens_in_content` decides what becomes of a row whose content spells a
control token: `literal` (the default) encodes that text as ordinary text, `reject` quarantines
the row naming the token, `parse` encodes it as control tokens (the behaviour of a plain
`tokenizer(text)`, counted in the log). Rows without such text are encoded in one batch.

Rows are truncated keeping their start (`truncate_or_reject`, the one rule for text and image
rows); a row left without any supervised token is rejected with a reason rather than trained on
(a batch of such rows would train on a loss of zero, silently). What became of each row is kept
in one `Outcome`: rejected (with the reason), truncated, parsed as control tokens.

Turn weights (`sft_pipeline.data.turn_rows`: a supervised segment's `"weight"`) become a float
`loss_weights` column aligned with `labels`: each supervised token's weight is its segment's (the
same first-non-whitespace anchor), 0 where the label is -100. The column exists only when some
row of the data weights a turn, so data without weights tokenizes to the same bytes as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetInfo, Features, Value
from datasets import Sequence as HFSequence

from sft_pipeline.common.config import TokenizationConfig
from sft_pipeline.common.labels import IGNORE_INDEX, LOSS_WEIGHTS
from sft_pipeline.data.encoding import (
    encode_literal_row,
    encode_prompted,
    encode_texts,
    forged_reason,
    literal_texts,
    require_fast,
)
from sft_pipeline.data.token_anchors import (
    WEIGHT_KEY,
    char_values,
    segment_value,
    supervised_char_mask,
    token_values,
)

# Importers of the encoding (generation, the GGUF check) also find it here.
__all__ = [
    "FEATURES",
    "Outcome",
    "encode_literal_row",
    "encode_texts",
    "encoded_rows",
    "summarize_token_stats",
    "token_features",
    "tokenize_batch",
    "tokenize_texts",
    "truncate_or_reject",
    "weighted_rows",
]

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 16
FEATURES = Features(
    {
        "record_id": Value("string"),
        "input_ids": HFSequence(Value("int32")),
        "attention_mask": HFSequence(Value("int32")),
        "labels": HFSequence(Value("int32")),
    }
)
# A JSON Lines row's segment with a weight, as `json.dumps` writes the key.
_WEIGHT_BYTES = b'"' + WEIGHT_KEY.encode() + b'": '


def token_features(weighted: bool) -> Features:
    """The columns of a tokens dataset: `FEATURES`, plus `loss_weights` where turns weigh."""
    if not weighted:
        return FEATURES
    return Features({**FEATURES, LOSS_WEIGHTS: HFSequence(Value("float32"))})


def weighted_rows(texts) -> bool:
    """Whether a rendered row weights a turn. A JSON Lines file (a handle with `path`) is
    first searched for the key's bytes, 16 MiB at a time, and its rows are parsed only where
    they are found (a tool call's argument may be named so too)."""
    path = getattr(texts, "path", None)
    if path is not None:
        with open(path, "rb") as f:
            tail = b""
            while block := f.read(1 << 24):
                if _WEIGHT_BYTES in tail + block[: len(_WEIGHT_BYTES)] or _WEIGHT_BYTES in block:
                    break
                tail = block[-len(_WEIGHT_BYTES) :]
            else:
                return False
    return any(WEIGHT_KEY in seg for row in texts for seg in row.get("segments", ()))


@dataclass
class Outcome:
    """What became of the rows of one tokenization (text and image rows alike): the rows
    rejected with their reason, the ids of rows truncated, of rows whose control-token text was
    parsed as control tokens (`parse`)."""

    rejected: list[dict[str, str]] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    parsed: list[str] = field(default_factory=list)

    def reject(self, record_id: str, reason: str) -> None:
        self.rejected.append({"record_id": record_id, "reason": reason})

    def log(self, rows: int, limit: int) -> None:
        if self.parsed:
            log.warning(
                "%d of %d rows hold control-token text in their content, parsed as control "
                "tokens (tokenization.special_tokens_in_content: parse): such data can forge turns",
                len(self.parsed),
                rows,
            )
        if self.truncated:
            log.warning("truncated %d of %d rows to %d tokens", len(self.truncated), rows, limit)
        if self.rejected:
            log.warning(
                "rejected %d of %d rows (no supervised token, or control-token text): see "
                "token_stats rejected_rows",
                len(self.rejected),
                rows,
            )


def encoded_rows(
    tokenizer,
    batch: Sequence[dict[str, Any]],
    special_tokens_in_content: str,
    outcome: Outcome,
    not_literal: Callable[[dict[str, Any]], str | None] | None = None,
) -> Iterator[tuple[dict[str, Any], str, np.ndarray, list, list]]:
    """(row, joined text, supervised char mask, ids, offsets) of each row of `batch` that is
    kept: plain rows encoded in one batch, rows with literal segments as
    `special_tokens_in_content` says (module doc); rows rejected for their control-token text,
    and rows parsed anyway (`parse`), go to `outcome`. `not_literal(row)`: why a row cannot be
    encoded literally (then `literal` rejects it too), or None."""
    mode = special_tokens_in_content
    from sft_pipeline.data.chat_templates import tokenizer_adds_bos

    bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""
    if mode == "parse":
        outcome.parsed.extend(row["record_id"] for row in batch if literal_texts(row["segments"]))
    joined = [supervised_char_mask(row["segments"]) for row in batch]
    literal = [mode != "parse" and bool(literal_texts(row["segments"])) for row in batch]
    plain = [
        (row["segments"], text)
        for row, (text, _), lit in zip(batch, joined, literal, strict=True)
        if not lit
    ]
    texts, cuts = [text for _, text in plain], [_prompt_end(segs, t, bos) for segs, t in plain]
    plain_rows = zip(*encode_prompted(tokenizer, texts, cuts), strict=True) if plain else iter(())
    for row, (text, char_mask), lit in zip(batch, joined, literal, strict=True):
        if not lit:
            ids, offsets = next(plain_rows)
        else:
            cannot = not_literal(row) if not_literal is not None else None
            if mode == "reject" or cannot:
                tokens = ", ".join(repr(t) for t in literal_texts(row["segments"]))
                why = (
                    "tokenization.special_tokens_in_content: reject" if mode == "reject" else cannot
                )
                outcome.reject(
                    row["record_id"], f"content holds the control token text {tokens} ({why})"
                )
                continue
            ids, offsets = encode_literal_row(tokenizer, row["segments"])
            forged = forged_reason(tokenizer, row["segments"], ids, offsets)
            if forged:
                outcome.reject(row["record_id"], forged)
                continue
        yield row, text, char_mask, ids, offsets


def _prompt_end(segments: Sequence[dict[str, Any]], text: str, bos: str) -> int:
    """Where a row's prompt ends (its first supervised character, as `supervised_char_mask`
    marks them), 0 for a row with no prompt beyond BOS (text records)."""
    first = pos = 0
    for seg in segments:
        if seg["text"] and segment_value(seg):
            first = pos
            break
        pos += len(seg["text"])
    if bos and text.startswith(bos) and first <= len(bos):
        return 0
    return first


def truncate_or_reject(
    record_id: str,
    ids: list[int],
    supervised: np.ndarray,
    limit: int,
    outcome: Outcome,
    image_end: int = 0,
) -> tuple[list[int], np.ndarray] | None:
    """A row's ids and supervision, cut to `limit` tokens keeping its start; None when the row
    is rejected instead (its reason in `outcome`): no supervised token at all, image tokens
    reaching past `limit` (up to `image_end`: a row is never cut inside an image), or no
    supervised token left after the cut."""
    if not supervised.any():
        outcome.reject(record_id, "no supervised token at all")
        return None
    if image_end > limit:
        outcome.reject(
            record_id,
            f"its image tokens run to position {image_end}, past "
            f"tokenization.max_seq_length={limit}; a row is never cut inside an image",
        )
        return None
    if len(ids) <= limit:
        return ids, supervised
    prompt = int(np.argmax(supervised))
    ids, supervised = ids[:limit], supervised[:limit]
    if not supervised.any():
        outcome.reject(
            record_id,
            f"no supervised token after truncation to {limit} tokens (prompt is {prompt} tokens)",
        )
        return None
    outcome.truncated.append(record_id)
    return ids, supervised


def tokenize_batch(
    batch,
    tokenizer,
    limit: int,
    outcome: Outcome,
    special_tokens_in_content: str = "literal",
    weighted: bool = False,
) -> pa.Table:
    """One batch of rendered rows as an Arrow table of int32 token columns (and float32
    `loss_weights` when `weighted`); what became of the rows that are not in it (or were cut)
    goes to `outcome`."""
    record_ids, id_rows, label_rows, weight_rows = [], [], [], []
    encoded = list(encoded_rows(tokenizer, batch, special_tokens_in_content, outcome))
    texts = [text for _, text, _, _, _ in encoded]
    offsets_rows = [offsets for *_, offsets in encoded]
    flags = token_values(texts, [mask for _, _, mask, _, _ in encoded], offsets_rows)
    if weighted:
        weights = [char_values(row["segments"], len(text), np.float32) for row, text, *_ in encoded]
        token_weights = token_values(texts, weights, offsets_rows)
    for k, (row, _text, _, ids, _) in enumerate(encoded):
        supervised = flags[k]
        kept = truncate_or_reject(row["record_id"], ids, supervised, limit, outcome)
        if kept is None:
            continue
        ids, supervised = kept
        ids_arr = np.asarray(ids, dtype=np.int32)
        record_ids.append(row["record_id"])
        id_rows.append(ids_arr)
        label_rows.append(np.where(supervised, ids_arr, np.int32(IGNORE_INDEX)).astype(np.int32))
        if weighted:
            weight_rows.append(token_weights[k][: len(ids)])
    lengths = np.fromiter((len(r) for r in id_rows), np.int32, len(id_rows))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))

    def lists(rows: list[np.ndarray], kind: pa.DataType | None = None) -> pa.ListArray:
        kind = kind or pa.int32()
        flat = np.concatenate(rows) if rows else np.zeros(0, kind.to_pandas_dtype())
        return pa.ListArray.from_arrays(offsets, pa.array(flat, kind))

    columns = {
        "record_id": pa.array(record_ids, pa.string()),
        "input_ids": lists(id_rows),
        "attention_mask": lists([np.ones(n, np.int32) for n in lengths]),
        "labels": lists(label_rows),
    }
    if weighted:
        columns[LOSS_WEIGHTS] = lists(weight_rows, pa.float32())
    return pa.table(columns)


def tokens_info(limit: int, truncated: list[str], features: Features = FEATURES) -> DatasetInfo:
    # The truncation record travels in the dataset's own metadata (saved in dataset_info.json),
    # so summarize_token_stats can report it without re-tokenizing.
    return DatasetInfo(
        description=json.dumps({"max_seq_length": limit, "truncated_record_ids": truncated}),
        features=features,
    )


def tokenize_texts(
    texts: list[dict[str, Any]], tokenizer, cfg: TokenizationConfig
) -> tuple[Dataset, list[dict[str, str]]]:
    """Tokenize rendered rows; returns the dataset and the rows rejected (with a reason)."""
    require_fast(tokenizer)
    outcome = Outcome()
    limit = cfg.max_seq_length
    weighted = weighted_rows(texts)
    features = token_features(weighted)
    tables = [
        tokenize_batch(
            texts[start : start + cfg.batch_size],
            tokenizer,
            limit,
            outcome,
            cfg.special_tokens_in_content,
            weighted,
        )
        for start in range(0, len(texts), cfg.batch_size)
    ]
    outcome.log(len(texts), limit)
    columns = {name: [] for name in features}
    for table in tables:
        for name in features:
            columns[name].extend(table[name].to_pylist())
    # from_dict with explicit features and info: the fingerprint is a hash of the content, so
    # save_to_disk output is byte-identical for the same input.
    return Dataset.from_dict(
        columns, features=features, info=tokens_info(limit, outcome.truncated, features)
    ), outcome.rejected


def _describe(values: np.ndarray) -> dict[str, float | int | None]:
    if values.size == 0:
        return {"min": None, "mean": None, "p50": None, "p95": None, "max": None}
    return {
        "min": int(values.min()),
        "mean": round(float(values.mean()), 3),
        "p50": round(float(np.percentile(values, 50)), 3),
        "p95": round(float(np.percentile(values, 95)), 3),
        "max": int(values.max()),
    }


def _truncated_ids(dataset: Dataset) -> list[str] | None:
    try:
        return json.loads(dataset.info.description)["truncated_record_ids"]
    except (TypeError, ValueError, KeyError):
        return None  # a dataset not made by tokenize_texts: unknown, not zero


def _label_batches(dataset: Dataset):
    """The record batches of a dataset's `labels`: read from its Arrow files without memory
    mapping when it has them (mapped pages would count as the process's memory), else from
    the table in memory."""
    files = [f["filename"] for f in dataset.cache_files]
    if not files or dataset._indices is not None:
        yield from dataset.data.table.select(["labels"]).to_batches()
        return
    for name in files:
        with pa.OSFile(name) as source:
            yield from pa.ipc.open_stream(source)


def _token_counts(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per row: tokens and supervised tokens, by Arrow compute over the table's batches."""
    lengths, supervised = [], []
    for batch in _label_batches(dataset):
        labels = batch.column("labels")
        lengths.append(pc.list_value_length(labels).to_numpy(zero_copy_only=False))
        flat = pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)
        rows = pc.list_parent_indices(labels).to_numpy()
        supervised.append(
            np.bincount(rows, weights=flat.to_numpy(zero_copy_only=False), minlength=len(labels))
        )
    if not lengths:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (
        np.concatenate(lengths).astype(np.int64),
        np.concatenate(supervised).astype(np.int64),
    )


def summarize_token_stats(
    splits: dict[str, tuple[list[dict[str, Any]], Dataset, list[dict[str, str]]]],
    cfg: TokenizationConfig,
) -> dict[str, Any]:
    """JSON-able token statistics per split (counts, lengths, rejects, a length histogram)."""
    edges = np.linspace(0, cfg.max_seq_length, HISTOGRAM_BINS + 1).round().astype(int)
    report: dict[str, Any] = {"max_seq_length": cfg.max_seq_length, "splits": {}}
    for name, (texts, dataset, rejected) in splits.items():
        lengths, supervised = _token_counts(dataset)
        truncated = _truncated_ids(dataset)
        counts, _ = np.histogram(lengths, bins=edges)
        report["splits"][name] = {
            "rows_in": len(texts),
            "rows_kept": len(dataset),
            "rejected": len(rejected),
            "rejected_rows": [
                {"record_id": r["record_id"], "reason": r["reason"]} for r in rejected
            ],
            "truncated": None if truncated is None else len(truncated),
            "input_length": _describe(lengths),
            "supervised_tokens": _describe(supervised),
            "total_tokens": int(lengths.sum()),
            "total_supervised_tokens": int(supervised.sum()),
            "length_histogram": {"bin_edges": edges.tolist(), "counts": counts.tolist()},
        }
    return report
