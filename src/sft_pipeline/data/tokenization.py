"""Tokenize rendered rows into `input_ids`, `attention_mask` and `labels` (-100 = not supervised).

Each row's segments are joined into the exact model text and tokenized in batches by the fast
tokenizer with `add_special_tokens=False` (the text already holds BOS where the model wants one,
so there is never a double BOS). Labels come from character spans: a token is supervised when its
first non-whitespace character lies in a supervised segment. Anchoring on the first
non-whitespace character handles SentencePiece tokens whose offsets start at the space they
absorbed (`▁Paris` after `[/INST]`), byte-level BPE tokens such as `ĠParis` after `Assistant: `,
and added tokens that swallow the whitespace after them (Phi-3's `<|end|>` covers `<|end|>\\n`).

A row that starts with the tokenizer's BOS (which the rendered text holds exactly when the model
was trained with one) is tokenized as the BOS id followed by the rest of the text tokenized on its
own, i.e. what `tokenizer(rest)` gives: the ids the model saw in pretraining and sees when a user
calls the tokenizer on a prompt. Tokenizing the BOS text inline would differ for SentencePiece
tokenizers that mark a word start (`▁`) only at the start of the input (Llama-2 converted from its
`tokenizer.model`): the first word would lose its `▁` (`<s>What` instead of `<s>▁What`).

Text inside a record that spells a control token comes from rendering as segments with
`"literal": true` (`sft_pipeline.data.templating`). `tokenization.special_tokens_in_content`
decides what becomes of such a row: `literal` (the default) encodes those segments as ordinary
text, `reject` quarantines the row naming the token, `parse` encodes them as control tokens (the
behaviour of a plain `tokenizer(text)`, counted in the log). A literal row is encoded piece by
piece: the text between literal segments as usual, each literal segment with all of the
tokenizer's added tokens switched off (special or not); a piece after the first is encoded after
a newline that is then dropped, so SentencePiece does not add the word-start space it adds at the
start of an input (transformers' `encode_marked_chat` does the same). Offsets stay those of the
whole text, so labels follow the same character rule. Rows without literal segments are encoded
as before.

Rows are truncated keeping their start; a row left without any supervised token is rejected with
a reason rather than trained on (a batch of such rows would train on a loss of zero, silently).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetInfo, Features, Value
from datasets import Sequence as HFSequence

from sft_pipeline.common.config import TokenizationConfig
from sft_pipeline.common.labels import IGNORE_INDEX

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


def supervised_char_mask(segments: Sequence[dict[str, Any]]) -> tuple[str, np.ndarray]:
    """The joined text and a per-character flag (length len(text) + 1) of supervised text."""
    text = "".join(s["text"] for s in segments)
    mask = np.zeros(len(text) + 1, dtype=bool)
    pos = 0
    for seg in segments:
        end = pos + len(seg["text"])
        if seg["supervised"]:
            mask[pos:end] = True
        pos = end
    return text, mask


# str.isspace for every code point up to U+3000, the last whitespace character in Unicode.
_SPACE = np.array([chr(c).isspace() for c in range(0x3001)], dtype=bool)


def whitespace_mask(text: str) -> np.ndarray:
    """Per character of `text`: `str.isspace()`, computed over the code points at once."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return _SPACE[np.minimum(codes, len(_SPACE) - 1)] & (codes < len(_SPACE))


def token_supervision(text: str, char_mask: np.ndarray, offsets: Sequence[Sequence[int]]):
    """Per token: is it supervised (by its first non-whitespace character, see module doc)."""
    is_space = whitespace_mask(text)
    # next_solid[c] = index of the first non-whitespace character at or after c.
    positions = np.where(is_space, len(text), np.arange(len(text)))
    next_solid = np.append(np.minimum.accumulate(positions[::-1])[::-1], len(text))
    flat = chain.from_iterable(offsets)  # np.fromiter: ~3x faster than asarray on tuples
    spans = np.fromiter(flat, dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)
    starts, ends = spans[:, 0], spans[:, 1]
    anchor = next_solid[starts]
    anchor = np.where(anchor < ends, anchor, starts)
    return char_mask[anchor]


def encode_texts(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple]]]:
    """Token ids and character offsets of each text, a leading BOS split off (module doc)."""
    from sft_pipeline.data.templating import tokenizer_adds_bos

    bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""
    split = [bool(bos) and text.startswith(bos) for text in texts]
    inputs = [text[len(bos) :] if cut else text for text, cut in zip(texts, split, strict=True)]
    batch_ids, batch_offsets = _encode(tokenizer, inputs)
    ids, offsets = [], []
    for cut, row_ids, row_offsets in zip(split, batch_ids, batch_offsets, strict=True):
        if cut:
            n = len(bos)
            row_ids = [tokenizer.bos_token_id, *row_ids]
            row_offsets = [(0, n), *((start + n, end + n) for start, end in row_offsets)]
        ids.append(list(row_ids))
        offsets.append(list(row_offsets))
    return ids, offsets


def _encode(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple]]]:
    """`tokenizer(texts, add_special_tokens=False)` ids and offsets, straight from the Rust
    backend when there is one: the same call transformers makes, with the same settings (no
    truncation, no padding, its `split_special_tokens`), without building a BatchEncoding."""
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    backend = getattr(tokenizer, "_tokenizer", None)
    setup = getattr(tokenizer, "set_truncation_and_padding", None)
    if backend is None or setup is None or not hasattr(backend, "encode_batch"):
        enc = tokenizer(
            texts,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            split_special_tokens=split_special,
        )
        return enc["input_ids"], enc["offset_mapping"]
    from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

    setup(
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        truncation_strategy=TruncationStrategy.DO_NOT_TRUNCATE,
        max_length=None,
        stride=0,
        pad_to_multiple_of=None,
        padding_side=None,
    )
    if backend.encode_special_tokens != split_special:
        backend.encode_special_tokens = split_special
    encodings = backend.encode_batch(texts, add_special_tokens=False, is_pretokenized=False)
    return [e.ids for e in encodings], [e.offsets for e in encodings]


def literal_texts(segments: Sequence[dict[str, Any]]) -> list[str]:
    """The control-token texts a row holds as data (its literal segments), each once."""
    return list(dict.fromkeys(s["text"] for s in segments if s.get("literal")))


def encode_literal_row(tokenizer, segments: Sequence[dict[str, Any]]) -> tuple[list, list]:
    """(ids, offsets) of a row with literal segments (module doc): the plain pieces as usual,
    the literal ones as text; offsets into the whole joined text (each token of a literal piece
    spans the whole piece, which is one control-token text in one segment)."""
    pieces: list[tuple[str, bool]] = []
    for seg in segments:
        literal = bool(seg.get("literal"))
        if pieces and not literal and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + seg["text"], False)
        else:
            pieces.append((seg["text"], literal))
    newline_ids = _encode(tokenizer, ["\n"])[0][0]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    start = 0
    for k, (text, literal) in enumerate(pieces):
        if literal:
            piece_ids = encode_as_text(tokenizer, text)
            piece_offsets = [(0, len(text))] * len(piece_ids)
        elif k == 0:
            (piece_ids,), (piece_offsets,) = encode_texts(tokenizer, [text])
        else:
            (piece_ids,), (piece_offsets,) = _encode(tokenizer, ["\n" + text])
            if list(piece_ids[: len(newline_ids)]) == list(newline_ids):
                piece_ids = piece_ids[len(newline_ids) :]
                piece_offsets = [(a - 1, b - 1) for a, b in piece_offsets[len(newline_ids) :]]
            else:  # the newline merged with the piece's start: encode it on its own
                (piece_ids,), (piece_offsets,) = _encode(tokenizer, [text])
        ids.extend(piece_ids)
        offsets.extend((start + max(a, 0), start + b) for a, b in piece_offsets)
        start += len(text)
    return ids, offsets


def encoded_rows(
    tokenizer,
    batch: Sequence[dict[str, Any]],
    special_tokens_in_content: str,
    rejected: list,
    parsed: list | None = None,
    not_literal: Callable[[dict[str, Any]], str | None] | None = None,
) -> Iterator[tuple[dict[str, Any], str, np.ndarray, list, list]]:
    """(row, joined text, supervised char mask, ids, offsets) of each row of `batch` that is
    kept: plain rows encoded in one batch, rows with literal segments as
    `special_tokens_in_content` says (module doc). Rows rejected for their control-token text go
    to `rejected`, the ids of rows parsed anyway (`parse`) to `parsed`. `not_literal(row)`: why a
    row cannot be encoded literally (then `literal` rejects it too), or None."""
    mode = special_tokens_in_content
    if parsed is not None and mode == "parse":
        parsed.extend(row["record_id"] for row in batch if literal_texts(row["segments"]))
    joined = [supervised_char_mask(row["segments"]) for row in batch]
    literal = [mode != "parse" and bool(literal_texts(row["segments"])) for row in batch]
    plain = [text for (text, _), lit in zip(joined, literal, strict=True) if not lit]
    plain_rows = zip(*encode_texts(tokenizer, plain), strict=True) if plain else iter(())
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
                rejected.append(
                    {
                        "record_id": row["record_id"],
                        "reason": f"content holds the control token text {tokens} ({why})",
                    }
                )
                continue
            ids, offsets = encode_literal_row(tokenizer, row["segments"])
            forged = forged_reason(tokenizer, row["segments"], ids, offsets)
            if forged:
                rejected.append({"record_id": row["record_id"], "reason": forged})
                continue
        yield row, text, char_mask, ids, offsets


def encode_as_text(tokenizer, text: str) -> list[int]:
    """`text` from the middle of a row encoded as plain text: no added token is matched, special
    or not (a backend's `encode_special_tokens` still matches the non-special ones, such as
    Qwen's `<tool_call>`), and no word-start space is added (encoded after a newline that is
    then dropped, as in the module doc)."""
    encode = tokenizer._encode_without_added_tokens
    newline_ids, ids = encode("\n"), encode("\n" + text)
    if ids[: len(newline_ids)] == newline_ids:
        return ids[len(newline_ids) :]
    return encode(text)


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} is not a fast "
            "tokenizer; labels need offset mappings, which only fast (Rust) tokenizers give. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def _tokenize_batch(
    batch,
    tokenizer,
    limit: int,
    rejected: list,
    truncated: list,
    special_tokens_in_content: str = "literal",
    parsed: list | None = None,
) -> pa.Table:
    """One batch of rendered rows as an Arrow table of int32 token columns.

    Rows with literal segments follow `special_tokens_in_content` (module doc); the ids of
    those parsed as control tokens anyway (`parse`) are appended to `parsed`."""
    record_ids, id_rows, label_rows = [], [], []
    for row, text, char_mask, ids, offsets in encoded_rows(
        tokenizer, batch, special_tokens_in_content, rejected, parsed
    ):
        supervised = token_supervision(text, char_mask, offsets) if ids else np.zeros(0, bool)
        if not supervised.any():
            rejected.append({"record_id": row["record_id"], "reason": "no supervised token at all"})
            continue
        if len(ids) > limit:
            first = int(np.argmax(supervised))
            ids, supervised = ids[:limit], supervised[:limit]
            if not supervised.any():
                rejected.append(
                    {
                        "record_id": row["record_id"],
                        "reason": f"no supervised token after truncation to {limit} tokens "
                        f"(prompt is {first} tokens)",
                    }
                )
                continue
            truncated.append(row["record_id"])
        ids_arr = np.asarray(ids, dtype=np.int32)
        record_ids.append(row["record_id"])
        id_rows.append(ids_arr)
        label_rows.append(np.where(supervised, ids_arr, np.int32(IGNORE_INDEX)).astype(np.int32))
    lengths = np.fromiter((len(r) for r in id_rows), np.int32, len(id_rows))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))

    def lists(rows: list[np.ndarray]) -> pa.ListArray:
        flat = np.concatenate(rows) if rows else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(flat, pa.int32()))

    return pa.table(
        {
            "record_id": pa.array(record_ids, pa.string()),
            "input_ids": lists(id_rows),
            "attention_mask": lists([np.ones(n, np.int32) for n in lengths]),
            "labels": lists(label_rows),
        }
    )


def forged_reason(tokenizer, segments, ids, offsets) -> str | None:
    """Why a literal row still holds a control token inside a literal segment, or None (a
    tokenizer whose plain-text vocabulary produces the control token itself)."""
    spans, pos = [], 0
    for seg in segments:
        if seg.get("literal"):
            spans.append((pos, pos + len(seg["text"]), seg["text"]))
        pos += len(seg["text"])
    for a, b, text in spans:
        token = tokenizer.convert_tokens_to_ids(text)
        if any(t == token for t, (start, _end) in zip(ids, offsets, strict=True) if a <= start < b):
            return (
                f"the tokenizer turns the text {text!r} into its control token even as plain "
                "text, so it cannot be trained on literally"
            )
    return None


def _info(limit: int, truncated: list[str]) -> DatasetInfo:
    # The truncation record travels in the dataset's own metadata (saved in dataset_info.json),
    # so summarize_token_stats can report it without re-tokenizing.
    return DatasetInfo(
        description=json.dumps({"max_seq_length": limit, "truncated_record_ids": truncated}),
        features=FEATURES,
    )


def _log_outcome(
    truncated: list, rejected: list, rows: int, limit: int, parsed: list | None = None
) -> None:
    if parsed:
        log.warning(
            "%d of %d rows hold control-token text in their content, parsed as control tokens "
            "(tokenization.special_tokens_in_content: parse): such data can forge turns",
            len(parsed),
            rows,
        )
    if truncated:
        log.warning("truncated %d of %d rows to %d tokens", len(truncated), rows, limit)
    if rejected:
        log.warning(
            "rejected %d of %d rows (no supervised token, or control-token text): see "
            "token_stats rejected_rows",
            len(rejected),
            rows,
        )


def tokenize_texts(
    texts: list[dict[str, Any]], tokenizer, cfg: TokenizationConfig
) -> tuple[Dataset, list[dict[str, str]]]:
    """Tokenize rendered rows; returns the dataset and the rows rejected (with a reason)."""
    _require_fast(tokenizer)
    rejected: list[dict[str, str]] = []
    truncated: list[str] = []
    parsed: list[str] = []
    limit = cfg.max_seq_length
    tables = [
        _tokenize_batch(
            texts[start : start + cfg.batch_size],
            tokenizer,
            limit,
            rejected,
            truncated,
            cfg.special_tokens_in_content,
            parsed,
        )
        for start in range(0, len(texts), cfg.batch_size)
    ]
    _log_outcome(truncated, rejected, len(texts), limit, parsed)
    columns = {name: [] for name in FEATURES}
    for table in tables:
        for name in FEATURES:
            columns[name].extend(table[name].to_pylist())
    # from_dict with explicit features and info: the fingerprint is a hash of the content, so
    # save_to_disk output is byte-identical for the same input.
    return Dataset.from_dict(columns, features=FEATURES, info=_info(limit, truncated)), rejected


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
