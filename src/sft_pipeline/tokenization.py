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

Rows are truncated keeping their start; a row left without any supervised token is rejected with
a reason rather than trained on (a batch of such rows would train on a loss of zero, silently).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Dataset, DatasetInfo, Features, Value
from datasets import Sequence as HFSequence

from sft_pipeline.config import TokenizationConfig
from sft_pipeline.labels import IGNORE_INDEX

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 16
FEATURES = Features(
    {
        "record_id": Value("string"),
        "input_ids": HFSequence(Value("int64")),
        "attention_mask": HFSequence(Value("int64")),
        "labels": HFSequence(Value("int64")),
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


def token_supervision(text: str, char_mask: np.ndarray, offsets: Sequence[Sequence[int]]):
    """Per token: is it supervised (by its first non-whitespace character, see module doc)."""
    is_space = np.fromiter((c.isspace() for c in text), dtype=bool, count=len(text))
    # next_solid[c] = index of the first non-whitespace character at or after c.
    next_solid = np.full(len(text) + 1, len(text), dtype=np.int64)
    solid_at = np.flatnonzero(~is_space)
    if solid_at.size:
        idx = np.searchsorted(solid_at, np.arange(len(text) + 1))
        found = idx < solid_at.size
        next_solid[found] = solid_at[idx[found]]
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = spans[:, 0], spans[:, 1]
    anchor = next_solid[starts]
    anchor = np.where(anchor < ends, anchor, starts)
    return char_mask[anchor]


def encode_texts(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple]]]:
    """Token ids and character offsets of each text, a leading BOS split off (module doc)."""
    from sft_pipeline.templating import tokenizer_adds_bos

    bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""
    split = [bool(bos) and text.startswith(bos) for text in texts]
    enc = tokenizer(
        [text[len(bos) :] if cut else text for text, cut in zip(texts, split, strict=True)],
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    ids, offsets = [], []
    for cut, row_ids, row_offsets in zip(
        split, enc["input_ids"], enc["offset_mapping"], strict=True
    ):
        if cut:
            n = len(bos)
            row_ids = [tokenizer.bos_token_id, *row_ids]
            row_offsets = [(0, n), *((start + n, end + n) for start, end in row_offsets)]
        ids.append(list(row_ids))
        offsets.append(list(row_offsets))
    return ids, offsets


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} is not a fast "
            "tokenizer; labels need offset mappings, which only fast (Rust) tokenizers give. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def tokenize_texts(
    texts: list[dict[str, Any]], tokenizer, cfg: TokenizationConfig
) -> tuple[Dataset, list[dict[str, str]]]:
    """Tokenize rendered rows; returns the dataset and the rows rejected (with a reason)."""
    _require_fast(tokenizer)
    columns: dict[str, list] = {name: [] for name in FEATURES}
    rejected: list[dict[str, str]] = []
    truncated: list[str] = []
    limit = cfg.max_seq_length
    for start in range(0, len(texts), cfg.batch_size):
        batch = texts[start : start + cfg.batch_size]
        joined = [supervised_char_mask(row["segments"]) for row in batch]
        batch_ids, batch_offsets = encode_texts(tokenizer, [text for text, _ in joined])
        for row, (text, char_mask), ids, offsets in zip(
            batch, joined, batch_ids, batch_offsets, strict=True
        ):
            supervised = token_supervision(text, char_mask, offsets) if ids else np.zeros(0, bool)
            if not supervised.any():
                rejected.append(
                    {"record_id": row["record_id"], "reason": "no supervised token at all"}
                )
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
            ids_arr = np.asarray(ids, dtype=np.int64)
            columns["record_id"].append(row["record_id"])
            columns["input_ids"].append(ids_arr.tolist())
            columns["attention_mask"].append([1] * len(ids))
            columns["labels"].append(np.where(supervised, ids_arr, IGNORE_INDEX).tolist())
    if truncated:
        log.warning("truncated %d of %d rows to %d tokens", len(truncated), len(texts), limit)
    if rejected:
        log.warning("rejected %d of %d rows with no supervised token", len(rejected), len(texts))
    # The truncation record travels in the dataset's own metadata (saved in dataset_info.json),
    # so summarize_token_stats can report it without re-tokenizing.
    info = DatasetInfo(
        description=json.dumps({"max_seq_length": limit, "truncated_record_ids": truncated}),
        features=FEATURES,
    )
    # from_dict with explicit features and info: the fingerprint is a hash of the content, so
    # save_to_disk output is byte-identical for the same input.
    return Dataset.from_dict(columns, features=FEATURES, info=info), rejected


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


def summarize_token_stats(
    splits: dict[str, tuple[list[dict[str, Any]], Dataset, list[dict[str, str]]]],
    cfg: TokenizationConfig,
) -> dict[str, Any]:
    """JSON-able token statistics per split (counts, lengths, rejects, a length histogram)."""
    edges = np.linspace(0, cfg.max_seq_length, HISTOGRAM_BINS + 1).round().astype(int)
    report: dict[str, Any] = {"max_seq_length": cfg.max_seq_length, "splits": {}}
    for name, (texts, dataset, rejected) in splits.items():
        lengths = np.asarray([len(ids) for ids in dataset["input_ids"]], dtype=np.int64)
        supervised = np.asarray(
            [sum(1 for x in labels if x != IGNORE_INDEX) for labels in dataset["labels"]],
            dtype=np.int64,
        )
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
