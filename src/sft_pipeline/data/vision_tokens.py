"""Tokenize rendered rows with images: exact image tokens, labels never on them, pixels cached.

A rendered row with images holds one placeholder per image (`<image>`, `<start_of_image>`, ...,
whatever the chat template writes) and the images' sources. The model's processor expands each
placeholder into the exact tokens of its image (LLaVA: `<image>` x 576; Idefics3: one
`<fake_token_around_image><row_i_col_j><image>...` block per tile; Gemma-3: `<start_of_image>`
+ 256 soft tokens + `<end_of_image>`) and turns the images into pixel values:

    rendered   USER: <image>\\nWho?  ASSISTANT: Kane.</s>      (segments: supervised spans)
    plain ids  U  :  <img>  \\n Who ?  A : Kane . </s>          labels from the spans, as for text
    expanded   U  :  <img> <img> <img> <img> \\n Who ? A : Kane . </s>
                        └── inserted by the processor: never supervised

Labels come from the text rule (`sft_pipeline.data.tokenization`) on the plain tokenization, then
carried onto the processor's ids through their alignment (`difflib`): tokens the processor keeps
keep their label, tokens it inserts or changes are not supervised, and a change that touches a
supervised token stops with an error (the processor would train on other ids than the labels
describe). Images belong to user turns, so expansion never lands in a supervised span.

A row whose image tokens reach past `max_seq_length` is rejected with a reason, never cut (a cut
image is the "image features and image tokens do not match" crash); text after the last image is
truncated like a text row.

What the processor returns besides the ids is stored per row ahead of training, so an epoch never
decodes an image: arrays flattened with their shape (`pixel_values` + `pixel_values_shape`,
`image_grid_thw`, `pixel_attention_mask`, ...), and per-token arrays (`token_type_ids`) as token
columns cut with the ids.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Features, Value
from datasets import Sequence as HFSequence

from sft_pipeline.common.labels import IGNORE_INDEX
from sft_pipeline.data import images
from sft_pipeline.data.streams import SHAPE_SUFFIX
from sft_pipeline.data.token_anchors import token_supervision
from sft_pipeline.data.tokenization import (
    FEATURES,
    Outcome,
    encoded_rows,
    truncate_or_reject,
)

log = logging.getLogger(__name__)

# Processor outputs with one value per token: cut and padded like the ids.
TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
_TEXT_KEYS = ("input_ids", "attention_mask")


class VisionTokenizationError(ValueError):
    """The processor's tokens cannot be reconciled with the rendered row's labels."""


def probe_outputs(processor) -> dict[str, np.dtype]:
    """The processor's extra outputs (name -> dtype), from one synthetic image."""
    from PIL import Image

    message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}]
    text = processor.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
    encoded = processor(
        text=[text],
        images=[[Image.new("RGB", (64, 64), (127, 127, 127))]],
        add_special_tokens=False,
        return_tensors="np",
    )
    return {k: np.asarray(v).dtype for k, v in encoded.items() if k not in _TEXT_KEYS}


def vision_features(outputs: dict[str, np.dtype]) -> Features:
    """The tokens artifact's features: the text columns plus the processor's outputs."""
    features = dict(FEATURES)
    for key, dtype in sorted(outputs.items()):
        if key in TOKEN_KEYS:
            features[key] = HFSequence(Value("int32"))
            continue
        kind = "float32" if np.issubdtype(dtype, np.floating) else "int64"
        features[key] = HFSequence(Value(kind))
        features[key + SHAPE_SUFFIX] = HFSequence(Value("int64"))
    return Features(features)


def _align(plain: list[int], supervised: np.ndarray, expanded: list[int]) -> np.ndarray:
    """Supervision of each expanded token (see the module doc), or an error."""
    out = np.zeros(len(expanded), dtype=bool)
    matcher = difflib.SequenceMatcher(None, plain, expanded, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            out[j1:j2] = supervised[i1:i2]
        elif supervised[i1:i2].any():
            raise VisionTokenizationError(
                f"the processor changed supervised tokens {plain[i1:i2]} into "
                f"{expanded[j1:j2]}; an image placeholder inside an assistant turn?"
            )
    return out, matcher


def _image_region_end(matcher, expanded: list[int], image_ids: set[int]) -> int:
    """One past the last position the processor inserted or that holds an image token."""
    end = 0
    for tag, _i1, _i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal" and j2 > j1:
            end = max(end, j2)
    hits = [k for k, t in enumerate(expanded) if t in image_ids]
    return max(end, hits[-1] + 1 if hits else 0)


def image_token_ids(processor) -> set[int]:
    """Ids the processor writes for image content (image, soft, tile and boundary tokens)."""
    tokenizer = processor.tokenizer
    ids = set()
    for name in ("image_token_id", "image_token_index", "boi_token_id", "eoi_token_id"):
        value = getattr(processor, name, None)
        if isinstance(value, int):
            ids.add(value)
    for name in ("image_token", "boi_token", "eoi_token", "fake_image_token", "global_image_tag"):
        token = getattr(processor, name, None) or getattr(tokenizer, name, None)
        if isinstance(token, str):
            tid = tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                ids.add(tid)
    return ids


_WITH_IMAGES = (
    "in a record with images, which the processor would encode as control tokens; remove it, "
    "or set tokenization.special_tokens_in_content: parse to train on it so"
)


def tokenize_vision_rows(
    batch: list[dict[str, Any]],
    processor,
    features: Features,
    limit: int,
    outcome: Outcome,
    special_tokens_in_content: str = "literal",
) -> pa.Table:
    """One batch of rendered rows (with or without images) as an Arrow table of `features`;
    what became of the rows that are not in it (or were cut) goes to `outcome`.

    Control-token text in a row's content (literal segments) follows
    `special_tokens_in_content` as in `sft_pipeline.data.tokenization`, except that a row with
    images cannot be encoded literally (the processor parses the whole text): with `literal` it
    is rejected, naming the text and the `parse` setting that trains on it as control tokens."""
    image_ids = image_token_ids(processor)
    columns: dict[str, list] = {name: [] for name in features}
    for row, text, char_mask, ids, offsets in encoded_rows(
        processor.tokenizer,
        batch,
        special_tokens_in_content,
        outcome,
        not_literal=lambda row: _WITH_IMAGES if row.get("images") else None,
    ):
        supervised = token_supervision(text, char_mask, offsets) if ids else np.zeros(0, bool)
        extras: dict[str, np.ndarray] = {}
        image_end = 0
        if row.get("images"):
            pictures = [images.open_image(p) for p in row["images"]]
            encoded = processor(
                text=[text], images=[pictures], add_special_tokens=False, return_tensors="np"
            )
            expanded = [int(t) for t in encoded["input_ids"][0]]
            try:
                supervised, matcher = _align(ids, supervised, expanded)
            except VisionTokenizationError as exc:
                raise VisionTokenizationError(f"record {row['record_id']}: {exc}") from None
            ids = expanded
            image_end = _image_region_end(matcher, expanded, image_ids)
            extras = {k: np.asarray(v) for k, v in encoded.items() if k not in _TEXT_KEYS}
        kept = truncate_or_reject(row["record_id"], ids, supervised, limit, outcome, image_end)
        if kept is None:
            continue
        ids, supervised = kept
        ids_arr = np.asarray(ids, dtype=np.int32)
        columns["record_id"].append(row["record_id"])
        columns["input_ids"].append(ids_arr)
        columns["attention_mask"].append(np.ones(len(ids_arr), np.int32))
        columns["labels"].append(np.where(supervised, ids_arr, np.int32(IGNORE_INDEX)))
        for key in features:
            if key in columns and key not in FEATURES and not key.endswith(SHAPE_SUFFIX):
                _store(columns, key, extras.get(key), len(ids_arr))
    schema = features.arrow_schema
    return pa.table(
        {name: pa.array(values, schema.field(name).type) for name, values in columns.items()}
    )


def tokenize_vision_batch(
    batch: list[dict[str, Any]],
    processor,
    features: Features,
    limit: int,
    rejected: list,
    truncated: list,
    special_tokens_in_content: str = "literal",
    parsed: list | None = None,
) -> pa.Table:
    """`tokenize_vision_rows` for a caller that keeps the outcome in its own lists (the
    trainer's dataset preparation)."""
    outcome = Outcome(rejected, truncated, [] if parsed is None else parsed)
    return tokenize_vision_rows(
        batch, processor, features, limit, outcome, special_tokens_in_content
    )


def _store(columns: dict[str, list], key: str, value: np.ndarray | None, n_tokens: int) -> None:
    if key in TOKEN_KEYS:
        row = np.zeros(n_tokens, np.int32) if value is None else value[0][:n_tokens]
        columns[key].append(np.asarray(row, np.int32))
        return
    if value is None:  # a row without images
        columns[key].append(np.zeros(0))
        columns[key + SHAPE_SUFFIX].append(np.zeros(1, np.int64))
        return
    columns[key].append(value.reshape(-1))
    columns[key + SHAPE_SUFFIX].append(np.asarray(value.shape, np.int64))
