"""Row order for training: length-grouped batches drawn from a seeded generator of their own."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order (random mega-batches, each sorted by length) from its own generator.

    The order of epoch e is drawn from a generator seeded with `seed + e`, never from the global
    RNG, which dropout and model building advance: a run resumed mid-epoch (the trainer skips
    the batches already trained) replays exactly the order the interrupted run was following,
    and every process of a distributed run draws the same order.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def row_lengths(dataset: Dataset, length_column: str) -> list[int]:
    """Tokens per row, from the length column when there is one (columnar, no row decoding)."""
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")
    if length_column in dataset.column_names:
        return table[length_column].to_pylist()
    return pc.list_value_length(table["input_ids"]).to_pylist()
