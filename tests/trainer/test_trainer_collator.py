"""DataCollatorForSFT and best-fit-decreasing packing: shapes, labels, boundaries."""

from __future__ import annotations

import random

import pytest
import torch

from sft_pipeline.trainer import DataCollatorForSFT, best_fit_decreasing, pack_rows

EOS = 2


def test_pads_to_longest_and_keeps_labels_including_eos_when_pad_is_eos():
    collator = DataCollatorForSFT(pad_token_id=EOS)
    rows = [
        {"input_ids": [5, 6, 7, EOS], "labels": [-100, -100, 7, EOS]},
        {"input_ids": [8, EOS], "labels": [-100, EOS]},
    ]
    batch = collator(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, EOS], [8, EOS, EOS, EOS]]
    # EOS stays supervised where tokenization said so; padding is -100 even though pad == EOS.
    assert batch["labels"].tolist() == [[-100, -100, 7, EOS], [-100, EOS, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["shift_labels"].tolist() == [[-100, 7, EOS, -100], [EOS, -100, -100, -100]]
    assert "position_ids" not in batch


def test_pad_to_multiple_of():
    batch = DataCollatorForSFT(pad_token_id=0, pad_to_multiple_of=8)(
        [{"input_ids": [1] * 9, "labels": [1] * 9}]
    )
    assert batch["input_ids"].shape == (1, 16)
    assert batch["labels"][0, 9:].eq(-100).all()


def test_packed_rows_restart_positions_and_number_documents():
    packed = pack_rows([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]], capacity=8)
    batch = DataCollatorForSFT(pad_token_id=0, pad_to_multiple_of=8)(
        [{k: v[0] for k, v in packed.items()}]
    )
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch["document_ids"].tolist() == [[1, 1, 1, 2, 2, 0, 0, 0]]
    # The first label of every packed sequence is never predicted from the one before it.
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100, -100]]
    assert "attention_mask" not in batch


def test_best_fit_decreasing_uses_each_row_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # Within 10% of the lower bound on the number of bins.
    assert len(bins) <= 1.1 * sum(lengths) / 128 + 1


def test_best_fit_picks_the_tightest_bin():
    # 7 and 5 open two bins; 3 fits best next to 7 (leaves 0), 5 then fits next to 5.
    assert best_fit_decreasing([7, 5, 3, 5], 10) == [[0, 2], [1, 3]]


def test_row_longer_than_capacity_is_an_error():
    with pytest.raises(ValueError, match="row 1 has 12 tokens"):
        best_fit_decreasing([3, 12], 10)


def test_collator_rejects_empty_batch():
    with pytest.raises(ValueError, match="empty"):
        DataCollatorForSFT(pad_token_id=0)([])


def test_collator_output_is_long():
    batch = DataCollatorForSFT(pad_token_id=0)([{"input_ids": [1, 2], "labels": [-100, 2]}])
    assert all(t.dtype == torch.long for t in batch.values())
