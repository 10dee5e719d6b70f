"""Deterministic train/eval split keyed on each record's content id.

A record's side depends only on `sha256(f"{seed}:{record_id}")`, never on its position or on the
other records, so adding data never moves an existing record between train and eval.
"""

from __future__ import annotations

import hashlib
import logging

import pandas as pd

from sft_pipeline.config import DataConfig

log = logging.getLogger(__name__)


def split_score(record_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the seed and the content id."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(valid: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, eval): a record goes to eval when its score < `cfg.eval_fraction`.

    Both sides keep the input order. Train is never empty while there is a record (the highest
    score moves to train); with two or more records and eval_fraction > 0, eval gets at least one
    (the lowest score). Only these tiny-data edge cases depend on the other records.
    """
    scores = pd.Series(
        [split_score(rid, cfg.seed) for rid in valid["record_id"]], index=valid.index, dtype=float
    )
    to_eval = scores < cfg.eval_fraction
    if cfg.eval_fraction > 0 and len(valid) >= 2 and not to_eval.any():
        to_eval[scores.idxmin()] = True
    if len(valid) and to_eval.all():
        to_eval[scores.idxmax()] = False
    train = valid[~to_eval].reset_index(drop=True)
    evaluation = valid[to_eval].reset_index(drop=True)
    log.info(
        "split %d records: %d train, %d eval (eval_fraction=%s, seed=%d)",
        len(valid),
        len(train),
        len(evaluation),
        cfg.eval_fraction,
        cfg.seed,
    )
    if cfg.eval_fraction > 0 and evaluation.empty:
        log.warning("the eval split is empty: one valid record cannot be split")
    return train, evaluation
