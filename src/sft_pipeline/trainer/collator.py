"""`DataCollatorForSFT`: pads tokenized rows into a batch without touching their labels.

Labels come from tokenization (the label rule in docs/architecture.md) and are only padded here,
with -100; the pad token id is used for `input_ids` only, so a tokenizer whose pad token is its
EOS never loses the EOS labels (the classic "model never stops" bug).

Packed rows (with `seq_lengths`) get `position_ids` that restart at 0 for every sequence and a
`document_ids` tensor (1, 2, ... per sequence, 0 on padding) from which the trainer builds the
block-diagonal attention mask for its attention backend.

With `padding_free_capacity`, unpacked rows are first re-packed, batch by batch, into as few rows
of at most that many tokens as best-fit-decreasing finds: the batch holds the same rows (so the
same loss as the padded batch: a sum over its supervised tokens), but no compute goes to padding.

Rows with a `loss_weights` column (turn weights, aligned with `labels`) also give
`shift_loss_weights`, aligned with `shift_labels` (0 on padding), which the loss multiplies each
token's NLL by; rows without it build no weight tensor at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sft_pipeline.common.labels import IGNORE_INDEX, LOSS_WEIGHTS
from sft_pipeline.trainer.packing import pack_rows
from sft_pipeline.trainer.vision import collate_vision, pack_vision_rows


@dataclass
class DataCollatorForSFT:
    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_free_capacity: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("DataCollatorForSFT got an empty list of rows")
        if self.padding_free_capacity and "seq_lengths" not in features[0]:
            features = self._repack(features)
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(features)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        packed = "seq_lengths" in features[0]
        weighted = LOSS_WEIGHTS in features[0]
        if weighted:
            weights = torch.zeros((batch_size, longest), dtype=torch.float32)
        if packed:
            position_ids = torch.zeros((batch_size, longest), dtype=torch.long)
            document_ids = torch.zeros((batch_size, longest), dtype=torch.long)
        else:
            attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            n = ids.numel()
            input_ids[row, :n] = ids
            row_labels = feature.get("labels")
            labels[row, :n] = ids if row_labels is None else torch.as_tensor(row_labels)
            if weighted:
                weights[row, :n] = torch.as_tensor(feature[LOSS_WEIGHTS], dtype=torch.float32)
            if packed:
                start = 0
                for doc, length in enumerate(feature["seq_lengths"], start=1):
                    position_ids[row, start : start + length] = torch.arange(length)
                    document_ids[row, start : start + length] = doc
                    start += length
                # Padding restarts positions too, so it reads as one more (ignored) sequence.
                position_ids[row, start:] = torch.arange(longest - start)
            else:
                attention_mask[row, :n] = 1
        # What position i predicts; the trainer's loss and num_items_in_batch both count these.
        shift_labels = torch.full_like(labels, IGNORE_INDEX)
        shift_labels[:, :-1] = labels[:, 1:]
        batch = {"input_ids": input_ids, "labels": labels, "shift_labels": shift_labels}
        if weighted:
            batch["shift_loss_weights"] = torch.zeros_like(weights)
            batch["shift_loss_weights"][:, :-1] = weights[:, 1:]
        if packed:
            batch["position_ids"] = position_ids
            batch["document_ids"] = document_ids
        else:
            batch["attention_mask"] = attention_mask
        if "pixel_values" in features[0]:
            batch.update(collate_vision(features, longest))
        return batch

    def _repack(self, features: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if "pixel_values" in features[0]:
            # Images travel with their rows (families that cannot pack are refused earlier).
            longest = max(len(f["input_ids"]) for f in features)
            return pack_vision_rows(features, max(self.padding_free_capacity, longest))
        ids = [list(f["input_ids"]) for f in features]
        labels = [
            ids[i] if f.get("labels") is None else list(f["labels"]) for i, f in enumerate(features)
        ]
        capacity = max(self.padding_free_capacity, *map(len, ids))
        weights = [f[LOSS_WEIGHTS] for f in features] if LOSS_WEIGHTS in features[0] else None
        packed = pack_rows(ids, labels, capacity, weights)
        return [dict(zip(packed, row, strict=True)) for row in zip(*packed.values(), strict=True)]
