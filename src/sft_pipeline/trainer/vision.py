"""Vision-language data in the trainer: datasets with images, their batches, which modules train.

Datasets come either pre-tokenized by the pipeline (`input_ids`, `labels` and the processor's
arrays stored flat with their shapes, `sft_pipeline.data.vision_tokens`) or in TRL's vision
format (`messages` with image parts plus `images`: PIL images, paths or `{"bytes", "path"}`),
which is rendered and tokenized here once, ahead of training, by the same code the pipeline runs.

Batches: ids, labels and per-token arrays are padded per row; the processor's arrays are joined
per family, by their shape:

    pixel_values (images, 3, H, W)         LLaVA, Gemma-3   -> concatenated: (all images, 3, H, W)
    pixel_values (patches, C*T*P*P)        Qwen2-VL         -> concatenated; image_grid_thw too
    pixel_values (1, tiles, 3, H, W)       Idefics3/SmolVLM -> padded to the most tiles, stacked:
    pixel_attention_mask (1, tiles, H, W)                      (rows, tiles, ...), zeros = none

Packing is refused: the image features of a packed row must line up with its image tokens
across sequence boundaries, and families with multi-dimensional rotary positions (Qwen2-VL)
cannot restart positions per sequence from a flat position-id row.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sft_pipeline.data.vision_tokens import SHAPE_SUFFIX, TOKEN_KEYS

log = logging.getLogger(__name__)

# Submodule names of the vision tower and of the projector across families.
VISION_TOWER = ("vision_tower", "visual", "vision_model")
PROJECTOR = ("multi_modal_projector", "connector", "merger")
# Arrays that carry a batch dimension per row (Idefics3's tiles): padded, then stacked.
_BATCHED = {"pixel_attention_mask"}


def is_vision_dataset(columns: Sequence[str]) -> bool:
    return "pixel_values" in columns or "images" in columns


def is_vision_model(model) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def refuse_packing(name: str, packing: bool, padding_free: bool) -> None:
    if packing or padding_free:
        what = "packing" if packing else "padding_free"
        raise ValueError(
            f"{name} holds images: {what} is not supported for vision-language data (a packed "
            "row's image features must line up with its image tokens, and Qwen2-VL-style "
            "rotary positions cannot restart per sequence); set training.packing: false and "
            "training.padding_free: false (SFTConfig(packing=False, padding_free=False))"
        )


def prepare_vision_dataset(dataset, processing_class, args, name: str, packing: bool):
    """Rows ready for the collator: pipeline tokens as they are, TRL vision rows tokenized."""
    from datasets import Dataset

    refuse_packing(name, packing, bool(getattr(args, "padding_free", False)))
    if "pixel_values" in dataset.column_names:
        if args.length_column_name not in dataset.column_names:
            lengths = [len(ids) for ids in dataset["input_ids"]]
            dataset = dataset.add_column(args.length_column_name, lengths)
        return dataset
    if not hasattr(processing_class, "image_processor"):
        raise ValueError(
            f"{name} holds images but processing_class is a {type(processing_class).__name__}; "
            "pass the model's processor: processing_class=AutoProcessor.from_pretrained(...)"
        )
    return Dataset.from_list(_tokenize_rows(dataset, processing_class, args, name))


def _tokenize_rows(dataset, processor, args, name: str) -> list[dict[str, Any]]:
    from sft_pipeline.common.config import TemplateConfig
    from sft_pipeline.data.records import to_canonical
    from sft_pipeline.data.templating import Renderer
    from sft_pipeline.data.vision_tokens import (
        probe_outputs,
        tokenize_vision_batch,
        vision_features,
    )

    renderer = Renderer(processor.tokenizer, TemplateConfig())
    rendered = []
    for number, row in enumerate(dataset, 1):
        schema = "messages" if "messages" in row else "prompt_response"
        _fmt, messages, _text = to_canonical(row, schema)
        try:
            rendered.append({"record_id": f"{name}:{number}", **renderer.row(messages)})
        except Exception as exc:
            raise ValueError(f"{name}, row {number}: cannot render: {exc}") from exc
    features = vision_features(probe_outputs(processor))
    rejected: list[dict[str, str]] = []
    limit = args.max_length or 10**9
    table = tokenize_vision_batch(rendered, processor, features, limit, rejected, [])
    for row in rejected:
        log.warning("%s: row %s rejected: %s", name, row["record_id"], row["reason"])
    if not table.num_rows:
        raise ValueError(f"{name}: no row left to train on ({len(rejected)} rejected)")
    rows = table.to_pylist()
    for row in rows:
        row[args.length_column_name] = len(row["input_ids"])
    return rows


def collate_vision(features: Sequence[dict[str, Any]], longest: int) -> dict[str, torch.Tensor]:
    """The processor's arrays of a batch (module doc); per-token arrays padded to `longest`."""
    batch: dict[str, torch.Tensor] = {}
    for key in TOKEN_KEYS:
        if key in features[0]:
            padded = torch.zeros((len(features), longest), dtype=torch.long)
            for row, feature in enumerate(features):
                values = torch.as_tensor(feature[key], dtype=torch.long)
                padded[row, : values.numel()] = values
            batch[key] = padded
    for shape_key in (k for k in features[0] if k.endswith(SHAPE_SUFFIX)):
        key = shape_key[: -len(SHAPE_SUFFIX)]
        arrays = [
            np.asarray(f[key]).reshape([int(d) for d in f[shape_key]])
            for f in features
            if list(f[shape_key]) != [0]
        ]
        if not arrays:
            continue  # no row of the batch has an image
        if key in _BATCHED or arrays[0].ndim == 5:
            batch[key] = torch.as_tensor(_pad_stack(features, key, shape_key))
        else:
            batch[key] = torch.as_tensor(np.concatenate(arrays))
    return batch


def _pad_stack(features, key: str, shape_key: str) -> np.ndarray:
    rows = [
        np.asarray(f[key]).reshape([int(d) for d in f[shape_key]])
        if list(f[shape_key]) != [0]
        else None
        for f in features
    ]
    sample = next(r for r in rows if r is not None)
    most = max(r.shape[1] for r in rows if r is not None)
    out = np.zeros((len(rows), most, *sample.shape[2:]), dtype=sample.dtype)
    for k, r in enumerate(rows):
        if r is not None:
            out[k, : r.shape[1]] = r[0]
    return out


def _region(name: str) -> str:
    parts = name.split(".")
    if any(p in VISION_TOWER for p in parts):
        return "vision_tower"
    if any(p in PROJECTOR for p in parts):
        return "projector"
    return "language_model"


def trained_regions(train_vision_tower: bool, train_projector: bool) -> set[str]:
    regions = {"language_model"}
    if train_vision_tower:
        regions.add("vision_tower")
    if train_projector:
        regions.add("projector")
    return regions


def lora_target_modules(model, target_modules: str | list[str], regions: set[str]) -> str:
    """A peft `target_modules` regex: the wanted linear layers inside `regions` only.

    `all-linear` means every linear layer of those regions but the output head; a list of names
    keeps those names, inside the regions."""
    leaves = set(target_modules) if isinstance(target_modules, list) else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        if _region(name) not in regions:
            continue
        if leaves is None or name.split(".")[-1] in leaves:
            names.append(name)
    if not names:
        raise ValueError(
            f"lora.target_modules={target_modules!r} matches no linear layer of the "
            f"{', '.join(sorted(regions))} of this vision-language model"
        )
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def freeze_untrained(model, regions: set[str]) -> int:
    """Full fine-tuning: no gradient for parameters outside `regions`; returns how many."""
    frozen = 0
    for name, param in model.named_parameters():
        if _region(name) not in regions:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen
