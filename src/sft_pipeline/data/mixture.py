"""Weighted mixtures of datasets (`data.sources`): which training records, how many times each.

Each source is ingested, validated and split on its own terms (its format, its rejects, its
eval records: the split is by content id, so a source's eval records never depend on the other
sources). The mixture is drawn from the training records only:

- `max_records` keeps at most that many of a source's training records, drawn without
  replacement;
- with weights, the mixture has `data.mixture_rows` rows (default: as many as the sources'
  training records kept), each source's share its weight over the weights' sum, rounded by
  largest remainder so the counts add up exactly. A source with fewer records than its share is
  upsampled: every record as many whole times as fit, the rest drawn without replacement, so no
  record is seen twice more than another of its source.

Every draw comes from numpy's generator seeded with (`data.seed`, the source's position), so the
same seed gives the same rows, and changing one source's records never changes another's draw.
Rows stay in input order (a record's copies side by side); the trainer shuffles.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

from sft_pipeline.common.config import DataConfig
from sft_pipeline.common.errors import UserError

log = logging.getLogger(__name__)


class MixtureError(UserError, ValueError):
    """A mixture that cannot be drawn (a weighted source left without training records)."""


def needs_mixing(cfg: DataConfig) -> bool:
    return any(s.weight is not None or s.max_records is not None for s in cfg.sources)


def shares(available: list[int], weights: list[float] | None, total: int | None) -> list[int]:
    """Rows per source: all available without weights, else `total` (default: the sum of
    `available`) split by weight with largest-remainder rounding."""
    if weights is None:
        return list(available)
    total = sum(available) if total is None else total
    exact = np.asarray(weights, float) / sum(weights) * total
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts), kind="stable")[: total - int(counts.sum())]:
        counts[k] += 1
    return [int(c) for c in counts]


def multiplicities(n: int, keep: int | None, rows: int, rng: np.random.Generator) -> np.ndarray:
    """How many times each of a source's `n` training records is in the mixture: at most `keep`
    of them eligible, `rows` rows in all (module doc)."""
    pool = np.arange(n) if keep is None or keep >= n else np.sort(rng.choice(n, keep, False))
    times = np.zeros(n, dtype=np.int64)
    if rows and not len(pool):
        return times
    whole, rest = divmod(rows, len(pool)) if len(pool) else (0, 0)
    times[pool] += whole
    if rest:
        times[pool[np.sort(rng.choice(len(pool), rest, replace=False))]] += 1
    return times


def mix_stream(train, cfg: DataConfig) -> tuple[Any, dict[str, dict[str, int]]]:
    """(mixed training `RecordTable`, per source {records, rows}) of the split's training
    records; the records themselves when no source has a weight or `max_records`."""
    from sft_pipeline.data.streams import ParquetSpool, iter_record_frames

    names = [s.label for s in cfg.sources]
    found: Counter[str] = Counter()
    for frame in iter_record_frames(train):
        found.update(frame["source"].tolist())
    report = {name: {"records": found[name], "rows": found[name]} for name in names}
    if not needs_mixing(cfg):
        return train, report
    available = [
        min(found[s.label], s.max_records) if s.max_records is not None else found[s.label]
        for s in cfg.sources
    ]
    weighted = cfg.sources[0].weight is not None
    weights = [s.weight for s in cfg.sources] if weighted else None
    rows = shares(available, weights, cfg.mixture_rows)
    empty = [name for name, n, r in zip(names, available, rows, strict=True) if r and not n]
    if empty:
        raise MixtureError(
            f"data.sources {empty} have no valid training records to draw their share from; "
            "see validation_report.json for what became of their records"
        )
    times = {
        s.label: multiplicities(
            found[s.label], s.max_records, r, np.random.default_rng([cfg.seed, k])
        )
        for k, (s, r) in enumerate(zip(cfg.sources, rows, strict=True))
    }
    seen: Counter[str] = Counter()
    out = ParquetSpool("train_records")
    for frame in iter_record_frames(train):
        repeat = np.empty(len(frame), dtype=np.int64)
        for j, name in enumerate(frame["source"].tolist()):
            repeat[j] = times[name][seen[name]]
            seen[name] += 1
        out.write(frame.loc[frame.index.repeat(repeat)].reset_index(drop=True))
    for name, r in zip(names, rows, strict=True):
        report[name]["rows"] = r
    shown = (f"{n} {r} ({r / max(sum(rows), 1):.1%})" for n, r in zip(names, rows, strict=True))
    log.info("training mixture of %d rows: %s", sum(rows), ", ".join(shown))
    return out.close(), report
