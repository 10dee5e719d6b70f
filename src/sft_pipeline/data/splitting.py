"""Deterministic train/eval split keyed on each record's content id.

A record's side depends only on `sha256(f"{seed}:{record_id}")`, never on its position or on the
other records, so adding data never moves an existing record between train and eval.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd

from sft_pipeline.common.config import DataConfig

log = logging.getLogger(__name__)


def split_score(record_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the seed and the content id."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_stream(valid, cfg: DataConfig):
    """(train, eval) `RecordTable`s of a `RecordTable` (or DataFrame) of valid records, in input
    order: a record goes to eval when its score < `cfg.eval_fraction`.

    Two streamed passes: the scores, then the records. Train is never empty while there is a
    record (the highest score moves to train); with two or more records and eval_fraction > 0,
    eval gets at least one (the lowest score). Only these tiny-data edge cases depend on the
    other records."""
    from sft_pipeline.data.streams import ParquetSpool, iter_record_frames

    def scores_of(frame: pd.DataFrame) -> np.ndarray:
        return np.fromiter(
            (split_score(rid, cfg.seed) for rid in frame["record_id"]), float, len(frame)
        )

    # Pass 1: how many go to eval, and where the lowest and highest scores are.
    total, n_eval = 0, 0
    low: tuple[float, int] = (2.0, -1)
    high: tuple[float, int] = (-1.0, -1)
    for frame in iter_record_frames(valid):
        scores = scores_of(frame)
        if len(scores):
            k_low, k_high = int(scores.argmin()), int(scores.argmax())
            low = min(low, (float(scores[k_low]), total + k_low))
            high = max(high, (float(scores[k_high]), -(total + k_high)))
        n_eval += int((scores < cfg.eval_fraction).sum())
        total += len(frame)
    force_eval = low[1] if cfg.eval_fraction > 0 and total >= 2 and n_eval == 0 else None
    force_train = -high[1] if total and n_eval + (force_eval is not None) == total else None

    train_out, eval_out = ParquetSpool("train_records"), ParquetSpool("eval_records")
    offset = 0
    for frame in iter_record_frames(valid):
        to_eval = scores_of(frame) < cfg.eval_fraction
        for forced, value in ((force_eval, True), (force_train, False)):
            if forced is not None and offset <= forced < offset + len(frame):
                to_eval[forced - offset] = value
        train_out.write(frame[~to_eval])
        eval_out.write(frame[to_eval])
        offset += len(frame)
    log.info(
        "split %d records: %d train, %d eval (eval_fraction=%s, seed=%d)",
        total,
        train_out.rows,
        eval_out.rows,
        cfg.eval_fraction,
        cfg.seed,
    )
    if cfg.eval_fraction > 0 and not eval_out.rows:
        log.warning("the eval split is empty: one valid record cannot be split")
    return train_out.close(), eval_out.close()
