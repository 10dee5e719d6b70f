"""Best-fit-decreasing packing of tokenized rows into fixed-capacity bins.

A packed row keeps each sequence's boundaries (`seq_lengths`), so the collator can restart
`position_ids` and the trainer can keep the sequences apart in attention. The first label of every
packed sequence is set to -100: predicting it from the previous sequence's last token would teach
the model a transition that never occurs at inference.

Per-token loss weights (`loss_weights`, turn weights), where rows have them, travel with their
tokens through every strategy: the same cuts and joins as the labels, 0 where a label is set to
-100 here.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from sft_pipeline.common.labels import IGNORE_INDEX, LOSS_WEIGHTS

# Token ids or labels per row; per-token loss weights per row, or None for rows without.
TokenRows = Sequence[Sequence[int]]
WeightRows = Sequence[Sequence[float]] | None


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group row indices into bins of total length <= `capacity`, longest rows first.

    Each row goes into the fullest bin that still has room (best fit), which leaves little
    padding; a row longer than `capacity` is an error here (truncate before packing).
    """
    if capacity <= 0:
        raise ValueError(f"packing capacity must be > 0, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Sorted (free space, bin id) pairs: bisect finds the tightest bin with enough room.
    free: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"row {index} has {length} tokens, more than the bin size {capacity}")
        pos = bisect.bisect_left(free, (length, -1))
        if pos == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
            continue
        space, bin_id = free.pop(pos)
        bins[bin_id].append(index)
        bisect.insort(free, (space - length, bin_id))
    return bins


def join_rows(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]
) -> tuple[list[int], list[int], list[int]]:
    """One packed row of these sequences: (input_ids, labels, seq_lengths)."""
    lengths = [len(row_ids) for row_ids, _ in zip(input_ids, labels, strict=True)]
    return [token for row in input_ids for token in row], _joined(labels, IGNORE_INDEX), lengths


def _joined(rows: Sequence[Sequence[Any]], first: Any) -> list[Any]:
    """Rows of per-token values joined end to end, each row's first value `first` (labels:
    -100, so no row is predicted from the one before; loss weights: 0 with it)."""
    out: list[Any] = []
    for row in rows:
        out.append(first)
        out.extend(row[1:])
    return out


def pack_rows(
    input_ids: TokenRows, labels: TokenRows, capacity: int, weights: WeightRows = None
) -> dict[str, list[Any]]:
    """Pack rows into columns `input_ids`, `labels`, `seq_lengths` (one entry per packed row),
    and `loss_weights` from `weights` where given."""
    bins = best_fit_decreasing([len(ids) for ids in input_ids], capacity)
    packed: dict[str, list[Any]] = {"input_ids": [], "labels": [], "seq_lengths": []}
    if weights is not None:
        packed[LOSS_WEIGHTS] = [_joined([weights[i] for i in m], 0.0) for m in bins]
    for members in bins:
        members_ids = [input_ids[i] for i in members]
        ids, labs, lengths = join_rows(members_ids, [labels[i] for i in members])
        packed["input_ids"].append(ids)
        packed["labels"].append(labs)
        packed["seq_lengths"].append(lengths)
    return packed


def split_long_rows(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], capacity: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Rows longer than `capacity` cut into pieces of at most `capacity` tokens (`bfd_split`);
    any column of per-token values (loss weights) is cut the same way by passing it as `labels`.

    Each piece is then packed as a sequence of its own, so a piece does not attend to the piece
    before it: nothing of a long row is dropped, but its later pieces lose their context.
    """
    out_ids: list[list[int]] = []
    out_labels: list[list[int]] = []
    for row_ids, row_labels in zip(input_ids, labels, strict=True):
        for start in range(0, len(row_ids), capacity):
            out_ids.append(list(row_ids[start : start + capacity]))
            out_labels.append(list(row_labels[start : start + capacity]))
    return out_ids, out_labels


def wrap_rows(
    input_ids: TokenRows, labels: TokenRows, capacity: int, weights: WeightRows = None
) -> dict[str, list[Any]]:
    """Rows joined end to end and cut every `capacity` tokens (`wrapped`), in dataset order.

    Unlike `pack_rows`, the pieces are plain rows: a token attends to the rows before it in its
    piece, and a row may continue in the next piece. The first token of every row is still not
    a training target (it would be predicted from the previous row's end).
    """
    ids = [token for row in input_ids for token in row]
    labs = _joined(labels, IGNORE_INDEX)
    chunks = range(0, len(ids), capacity)
    wrapped = {
        "input_ids": [ids[s : s + capacity] for s in chunks],
        "labels": [labs[s : s + capacity] for s in chunks],
    }
    if weights is not None:
        joined = _joined(weights, 0.0)
        wrapped[LOSS_WEIGHTS] = [joined[s : s + capacity] for s in chunks]
    return wrapped


def pack_by_strategy(
    input_ids: TokenRows,
    labels: TokenRows,
    capacity: int,
    strategy: str = "bfd",
    weights: WeightRows = None,
) -> dict[str, list[Any]]:
    """Pack with `SFTConfig.packing_strategy`: 'bfd', 'bfd_split' or 'wrapped'; `weights`:
    the rows' loss weights, packed alike (`loss_weights`)."""
    if strategy == "wrapped":
        return wrap_rows(input_ids, labels, capacity, weights)
    if strategy == "bfd_split":
        if weights is not None:
            _, weights = split_long_rows(input_ids, weights, capacity)
        input_ids, labels = split_long_rows(input_ids, labels, capacity)
    return pack_rows(input_ids, labels, capacity, weights)
