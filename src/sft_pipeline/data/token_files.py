"""Tokens written as a `save_to_disk` folder while they are made, batch by batch.

`tokenize_stream` is `tokenization.tokenize_texts` for data of any size: rendered rows are read
in batches of `tokenization.batch_size`, tokenized with the same label rule, and appended to the
folder's Arrow file in record batches of a fixed `ARROW_BATCH_ROWS`, so the bytes depend only on
the tokens. The folder is laid out as `Dataset.save_to_disk` lays it out, and the Kedro dataset
moves it into place instead of copying the table through memory.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from sft_pipeline.common.config import TokenizationConfig
from sft_pipeline.common.labels import LOSS_WEIGHTS
from sft_pipeline.data.encoding import require_fast
from sft_pipeline.data.tokenization import (
    FEATURES,
    Outcome,
    token_features,
    tokenize_batch,
    tokens_info,
    weighted_rows,
)


def _content_parts(table: pa.Table):
    """Bytes of a batch's content that do not depend on where batches begin and end."""
    yield "ids", pc.list_flatten(table["input_ids"]).to_numpy().tobytes()
    yield "labels", pc.list_flatten(table["labels"]).to_numpy().tobytes()
    lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
    yield "lengths", lengths.astype(np.int64).tobytes()
    yield "record_ids", "".join(f"{r}\0" for r in table["record_id"].to_pylist()).encode()
    if LOSS_WEIGHTS in table.column_names:
        yield LOSS_WEIGHTS, pc.list_flatten(table[LOSS_WEIGHTS]).to_numpy().tobytes()


def tokenize_stream(
    texts,
    tokenizer,
    cfg: TokenizationConfig,
    name: str = "tokens",
    processor=None,
    turn_weights: bool = True,
):
    """`tokenize_texts` over a `JSONLines` handle (or list) batch by batch, written straight into
    a spooled `save_to_disk` folder; returns (Dataset memory-mapped on it, rejected rows).

    `ArrowDataset.save` moves that folder into place instead of copying the table through
    memory. The dataset's fingerprint is a sha256 of its token content, so the same tokens give
    the same bytes, whatever the batch size. With a vision-language model's `processor`, rows
    with images are expanded and their pixels stored (`sft_pipeline.data.vision_tokens`).
    `turn_weights`: a `loss_weights` column where rows weight turns (False: none, for rows
    that are scored, not trained)."""
    import hashlib

    from datasets.arrow_writer import ArrowWriter

    from sft_pipeline.data.streams import Progress, spool_dir

    require_fast(tokenizer)
    outcome = Outcome()
    limit = cfg.max_seq_length
    folder = spool_dir(name) / name
    folder.mkdir()
    shard = folder / "data-00000-of-00001.arrow"
    digests = {part: hashlib.sha256() for part in ("ids", "lengths", "labels", "record_ids")}
    progress = Progress(f"tokenize_conversations ({name})", len(texts))
    batches = (
        texts.iter_batches(cfg.batch_size)
        if hasattr(texts, "iter_batches")
        else (texts[i : i + cfg.batch_size] for i in range(0, len(texts), cfg.batch_size))
    )
    weighted = turn_weights and weighted_rows(texts)
    features = token_features(weighted)
    if weighted:
        digests[LOSS_WEIGHTS] = hashlib.sha256()
    if weighted and processor is not None:
        raise ValueError(
            f"{name}: turn weights (a message's weight other than 0 or 1) are not carried for a "
            "vision-language model's rows yet; use weights 0 or 1 with this model"
        )
    if processor is not None:
        from sft_pipeline.data import vision_tokens

        features = vision_tokens.vision_features(vision_tokens.probe_outputs(processor))
        digests["vision"] = hashlib.sha256()
    writer = ArrowWriter(features=features, path=str(shard))
    pending: list[pa.Table] = []
    for batch in batches:
        if processor is None:
            table = tokenize_batch(
                batch, tokenizer, limit, outcome, cfg.special_tokens_in_content, weighted
            )
        else:
            table = vision_tokens.tokenize_vision_rows(
                batch, processor, features, limit, outcome, cfg.special_tokens_in_content
            )
            for column in table.column_names[len(FEATURES) :]:
                digests["vision"].update(pc.list_flatten(table[column]).to_numpy().tobytes())
        for part, data in _content_parts(table):
            digests[part].update(data)
        pending.append(table.cast(features.arrow_schema))
        pending = _write_full_batches(writer, pending)
        progress.update(len(batch))
    rest = pa.concat_tables(pending) if pending else features.arrow_schema.empty_table()
    if rest.num_rows or not writer._num_examples:
        writer.write_table(rest)
    writer.finalize()
    progress.finish()
    outcome.log(progress.done, limit)
    digest = hashlib.sha256(json.dumps(outcome.truncated).encode())
    for part in digests.values():
        digest.update(part.digest())
    info = tokens_info(limit, outcome.truncated)
    info.features = features
    dataset = Dataset.from_file(str(shard), info=info)
    dataset._fingerprint = digest.hexdigest()[:16]
    _write_dataset_state(dataset, folder)
    dataset.spooled_folder = folder  # read by ArrowDataset.save
    return dataset, outcome.rejected


# Rows per Arrow record batch in the tokens file: fixed, so the bytes do not depend on
# `tokenization.batch_size`.
ARROW_BATCH_ROWS = 1000


def _write_full_batches(writer, pending: list[pa.Table]) -> list[pa.Table]:
    """Write every full `ARROW_BATCH_ROWS` slice of `pending`; return what is left."""
    if sum(t.num_rows for t in pending) < ARROW_BATCH_ROWS:
        return pending
    merged = pa.concat_tables(pending).combine_chunks()
    full = merged.num_rows - merged.num_rows % ARROW_BATCH_ROWS
    for start in range(0, full, ARROW_BATCH_ROWS):
        writer.write_table(merged.slice(start, ARROW_BATCH_ROWS))
    return [merged.slice(full)] if full < merged.num_rows else []


def _write_dataset_state(dataset: Dataset, folder) -> None:
    """state.json and dataset_info.json exactly as `Dataset.save_to_disk` writes them."""
    from dataclasses import asdict

    state = {
        key: dataset.__dict__[key]
        for key in (
            "_fingerprint",
            "_format_columns",
            "_format_kwargs",
            "_format_type",
            "_output_all_columns",
        )
    }
    state["_split"] = None
    state["_data_files"] = [{"filename": "data-00000-of-00001.arrow"}]
    with (folder / "state.json").open("w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    info = asdict(dataset._info)
    with (folder / "dataset_info.json").open("w", encoding="utf-8") as f:
        json.dump({key: info[key] for key in sorted(info)}, f, indent=2)
