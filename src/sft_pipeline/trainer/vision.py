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

Packing (and padding-free batches) where the family's attention keeps rows apart with what
packing gives it, position ids restarting per row and the block-diagonal causal mask
(`sft_pipeline.trainer.collator`): a packed row carries its members' images in token order,

    row A  ids a1 <img> a2 a3     pixel_values (1, 3, H, W)     LLaVA: images concatenated
    row B  ids b1 <img> b2        pixel_values (1, 3, H, W)
    packed ids a1 <img> a2 a3 b1 <img> b2    seq_lengths [4, 3]    pixel_values (2, 3, H, W)
           positions 0 1 2 3 0 1 2 (each row attends within itself only)

    Idefics3 (1, tiles, 3, H, W) per row -> (1, tiles_A + tiles_B, 3, H, W): joined along tiles

Qwen2-VL/Qwen2.5-VL place tokens with 3-D rotary positions (M-RoPE: time, height, width of each
image patch; text advances all three together). The model builds them from a whole row, so for
a packed row the trainer asks the model's own `get_rope_index` once per sequence, with that
sequence's ids and image grids, and every sequence starts again from 0:

    packed   [sys user <img x4> q | sys user <img x2> q]   image_grid_thw [[1,4,4], [1,2,4]]
    t,h,w    0 1 2 2 2 2 4 ...    | 0 1 2 2 ...              (grids taken in token order)

Packing is refused, naming why, where rows need more than that: Gemma-3's image tokens attend to
each other both ways through a mask the model builds from a whole row's `token_type_ids`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sft_pipeline.data.turns import is_messages
from sft_pipeline.data.vision_tokens import SHAPE_SUFFIX, TOKEN_KEYS
from sft_pipeline.model.loading import PROJECTOR, VISION_TOWER
from sft_pipeline.trainer.packing import best_fit_decreasing, join_rows

log = logging.getLogger(__name__)

# Arrays that carry a batch dimension per row (Idefics3's tiles): padded, then stacked.
_BATCHED = {"pixel_attention_mask"}


def is_vision_dataset(columns: Sequence[str]) -> bool:
    return "pixel_values" in columns or "images" in columns


def is_vision_model(model) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def packing_refusal(columns: Sequence[str]) -> str | None:
    """Why rows with these columns (the processor's outputs) cannot be packed, or None."""
    if "token_type_ids" in columns:
        return (
            "its image tokens attend to each other both ways (Gemma-3) through a mask the model "
            "builds from a whole row's token_type_ids, which a packed row's mask cannot carry"
        )
    return None


def check_packing(name: str, columns: Sequence[str], packing: bool, padding_free: bool) -> None:
    if not (packing or padding_free):
        return
    reason = packing_refusal(columns)
    if reason is not None:
        what = "packing" if packing else "padding_free"
        raise ValueError(
            f"{name} holds images for a model whose rows cannot be packed ({what}): {reason}; "
            "set training.packing: false and training.padding_free: false "
            "(SFTConfig(packing=False, padding_free=False))"
        )


def prepare_vision_dataset(dataset, processing_class, args, name: str, packing: bool):
    """Rows ready for the collator: pipeline tokens as they are, TRL vision rows tokenized;
    packed when asked and the family allows it (module doc)."""
    from datasets import Dataset

    if "pixel_values" not in dataset.column_names:
        if not hasattr(processing_class, "image_processor"):
            raise ValueError(
                f"{name} holds images but processing_class is a "
                f"{type(processing_class).__name__}; pass the model's processor: "
                "processing_class=AutoProcessor.from_pretrained(...)"
            )
        dataset = Dataset.from_list(_tokenize_rows(dataset, processing_class, args, name))
    check_packing(name, dataset.column_names, packing, bool(getattr(args, "padding_free", False)))
    if packing:
        return _packed_dataset(dataset, args, name)
    if args.length_column_name not in dataset.column_names:
        lengths = [len(ids) for ids in dataset["input_ids"]]
        dataset = dataset.add_column(args.length_column_name, lengths)
    return dataset


def _packed_dataset(dataset, args, name: str):
    from datasets import Dataset, Features, Value
    from datasets import Sequence as HFSequence

    capacity = args.max_length or max(len(ids) for ids in dataset["input_ids"])
    rows = pack_vision_rows(dataset.to_list(), capacity)
    kept = {k: v for k, v in dataset.features.items() if k in rows[0]}
    features = Features({**kept, "seq_lengths": HFSequence(Value("int32"))})
    log.info("%s: packed %d rows with images into %d rows", name, len(dataset), len(rows))
    return Dataset.from_list(rows, features=features)


def pack_vision_rows(rows: Sequence[dict[str, Any]], capacity: int) -> list[dict[str, Any]]:
    """Rows packed best-fit-decreasing into rows of at most `capacity` tokens, each with its
    members' images in token order (module doc)."""
    bins = best_fit_decreasing([len(r["input_ids"]) for r in rows], capacity)
    shape_keys = [k for k in rows[0] if k.endswith(SHAPE_SUFFIX)]
    packed = []
    for members in bins:
        group = [rows[i] for i in members]
        ids, labels, lengths = join_rows(
            [r["input_ids"] for r in group], [r["labels"] for r in group]
        )
        row: dict[str, Any] = {"input_ids": ids, "labels": labels, "seq_lengths": lengths}
        for key in TOKEN_KEYS:
            if key in rows[0]:
                row[key] = [t for r in group for t in r[key]]
        for shape_key in shape_keys:
            key = shape_key[: -len(SHAPE_SUFFIX)]
            row[key], row[shape_key] = _join_arrays(group, key, shape_key)
        packed.append(row)
    return packed


def _join_arrays(group, key: str, shape_key: str) -> tuple[np.ndarray, list[int]]:
    arrays = [
        np.asarray(r[key]).reshape([int(d) for d in r[shape_key]])
        for r in group
        if list(r[shape_key]) != [0]
    ]
    if not arrays:
        return np.zeros(0), [0]
    axis = 1 if key in _BATCHED or arrays[0].ndim == 5 else 0
    joined = np.concatenate(arrays, axis=axis)
    return joined.reshape(-1), list(joined.shape)


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
    for number, row in enumerate(_images_undecoded(dataset), 1):
        schema = "messages" if "messages" in row else "prompt_response"
        supervise_from = 0
        if is_messages(row.get("prompt")) and is_messages(row.get("completion")):
            # TRL's conversational prompt-completion: one conversation, the completion's turns
            # supervised (all assistant turns with completion_only_loss=False).
            prompt = list(row["prompt"])
            row = {"messages": prompt + list(row["completion"]), "images": row.get("images")}
            schema = "messages"
            if args.completion_only_loss is not False:
                supervise_from = len(prompt)
        _fmt, messages, _text = to_canonical(row, schema)
        try:
            rendered.append(
                {
                    "record_id": f"{name}:{number}",
                    **renderer.row(messages, supervise_from=supervise_from),
                }
            )
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


def _images_undecoded(dataset):
    """`dataset` with its `datasets.Image` columns read as stored (`{"bytes", "path"}`), not
    decoded: each row's images are then hashed from their bytes and decoded once, by the
    processor, instead of decoded here and re-encoded to PNG for the canonical record."""
    import copy

    from datasets import Features, Image

    def undecoded(feature):
        if isinstance(feature, Image):
            return Image(mode=feature.mode, decode=False)
        if isinstance(feature, dict):
            return {key: undecoded(value) for key, value in feature.items()}
        if hasattr(feature, "feature"):  # List, Sequence, LargeList
            copied = copy.copy(feature)
            copied.feature = undecoded(feature.feature)
            return copied
        return feature

    features = getattr(dataset, "features", None)
    if not features or not hasattr(dataset, "cast"):
        return dataset
    raw = Features({key: undecoded(value) for key, value in features.items()})
    return dataset if raw == features else dataset.cast(raw)


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
        # Per row: its array in its own shape, None for a row without an image.
        rows = [
            np.asarray(f[key]).reshape([int(d) for d in f[shape_key]])
            if list(f[shape_key]) != [0]
            else None
            for f in features
        ]
        arrays = [r for r in rows if r is not None]
        if not arrays:
            continue  # no row of the batch has an image
        if key in _BATCHED or arrays[0].ndim == 5:
            batch[key] = torch.as_tensor(_pad_stack(rows))
        else:
            batch[key] = torch.as_tensor(np.concatenate(arrays))
    return batch


def _pad_stack(rows: list[np.ndarray | None]) -> np.ndarray:
    """Rows' `(1, n, ...)` arrays stacked into `(rows, most n, ...)`, zero-padded (zeros for a
    row without an image)."""
    sample = next(r for r in rows if r is not None)
    most = max(r.shape[1] for r in rows if r is not None)
    out = np.zeros((len(rows), most, *sample.shape[2:]), dtype=sample.dtype)
    for k, r in enumerate(rows):
        if r is not None:
            out[k, : r.shape[1]] = r[0]
    return out


def packed_rope_positions(model, inputs: dict[str, Any], document_ids: torch.Tensor):
    """3-D rotary positions `(3, rows, length)` of packed rows (module doc), each sequence's from
    the model's own `get_rope_index`; padding counts as one more (text) sequence."""
    rope_index = next(
        (m.get_rope_index for m in model.modules() if callable(getattr(m, "get_rope_index", None))),
        None,
    )
    if rope_index is None:
        raise ValueError(
            f"{type(model).__name__} has 3-D rotary positions (image_grid_thw) but no "
            "get_rope_index to build them per packed sequence; set training.packing: false and "
            "training.padding_free: false"
        )
    input_ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    grids = iter(inputs["image_grid_thw"])
    positions = torch.zeros((3, *input_ids.shape), dtype=torch.long, device=input_ids.device)
    for row in range(input_ids.shape[0]):
        for doc in torch.unique_consecutive(document_ids[row]).tolist():
            span = document_ids[row] == doc
            kinds = types[row, span]
            starts = (kinds == 1) & ~torch.nn.functional.pad(kinds == 1, (1, 0))[:-1]
            taken = [next(grids) for _ in range(int(starts.sum()))]
            sequence, _deltas = rope_index(
                input_ids[row, span][None],
                mm_token_type_ids=kinds[None],
                image_grid_thw=torch.stack(taken) if taken else None,
            )
            positions[:, row, span] = sequence[:, 0].to(positions.device)
    return positions


def _region(name: str) -> str:
    """The part of a vision-language model a parameter or module belongs to.

    The projector is looked for first: some families nest it inside the tower (Qwen2-VL's patch
    merger is `model.visual.merger`), so a name that passes through both is the projector's.
    """
    parts = name.split(".")
    if any(p in PROJECTOR for p in parts):
        return "projector"
    if any(p in VISION_TOWER for p in parts):
        return "vision_tower"
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
    with_linear = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        with_linear.add(_region(name))
        if _region(name) not in regions:
            continue
        if leaves is None or name.split(".")[-1] in leaves:
            names.append(name)
    for region in sorted(regions - with_linear - {"language_model"}):
        # Gemma-3's projector is a bare weight matrix, no Linear module: LoRA cannot adapt it,
        # and asking for it must not train nothing in silence.
        raise ValueError(
            f"training.train_{region}: the {region.replace('_', ' ')} of this "
            f"{type(model).__name__} has no linear layer LoRA can adapt; train it with full "
            "fine-tuning (lora.enabled: false) or set the switch to false"
        )
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
