"""Text in a record that spells a control token stays text: marked before rendering, a
segment of its own after.

Data is data: text inside a record that spells a control token (`<|im_end|>\n<|im_start|>system`)
must not become one, or a record could forge turns. Such spans are found with transformers'
own rule (`sanitize_control_tokens`: the tokenizer's special tokens and the added tokens the
template writes), marked before rendering, and come out as segments of their own with
`"literal": true`, which tokenization encodes as ordinary text
(`tokenization.special_tokens_in_content`). Rows without such text render exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

Segment = dict[str, Any]


def mark(value: Any, control: re.Pattern) -> Any:
    """Wrap the `control` tokens in every string of `value` in transformers' private-use markers
    (which are removed from the strings first, so data cannot forge a mark)."""
    from transformers.utils.chat_template_utils import mark_control_tokens

    if value is None:
        return None
    return mark_control_tokens(value, control)


def special_token_texts(tokenizer) -> list[str]:
    """Texts of special and added tokens, longest first (so `<|end|>` is not read as `<`...)."""
    texts = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return sorted((t for t in texts if t), key=len, reverse=True)


def merge_adjacent(segments: Sequence[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for seg in segments:
        if not seg["text"]:
            continue
        kind = (seg["supervised"], seg.get("literal", False))
        if merged and (merged[-1]["supervised"], merged[-1].get("literal", False)) == kind:
            merged[-1] = {**merged[-1], "text": merged[-1]["text"] + seg["text"]}
        else:
            merged.append(dict(seg))
    return merged


def strings(value: Any) -> Iterator[str]:
    """Every string value in nested lists and dicts (dict keys are names, not data)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings(item)


def _unmark(value: Any, markers: re.Pattern) -> Any:
    """`value` with marked control tokens back to their text and lone markers dropped."""
    if isinstance(value, str):
        return markers.sub(lambda m: m.group(1) or "", value)
    if isinstance(value, dict):
        return {key: _unmark(item, markers) for key, item in value.items()}
    if isinstance(value, list):
        return [_unmark(item, markers) for item in value]
    return value


def literal_row(row: dict[str, Any], markers: re.Pattern) -> dict[str, Any]:
    """A row rendered from marked data: each marked control token becomes a segment of its
    own with `"literal": true` (its text, tokenized as text); everything else as rendered.

        [{"text": "<|im_start|>user\nhi \U000f0000<|im_end|>\U000f0001 there<|im_end|>...",
          "supervised": false}, ...]
     -> [{"text": "<|im_start|>user\nhi ", "supervised": false},
         {"text": "<|im_end|>", "supervised": false, "literal": true},
         {"text": " there<|im_end|>...", "supervised": false}, ...]

    A lone marker (a template's string method split a marked token apart) is dropped.
    """
    segments: list[Segment] = []
    for seg in row["segments"]:
        pieces = markers.split(seg["text"])
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                segments.append({"text": piece, "supervised": seg["supervised"]})
            elif piece:
                segments.append({"text": piece, "supervised": seg["supervised"], "literal": True})
    out = {key: _unmark(value, markers) for key, value in row.items() if key != "segments"}
    return {"segments": merge_adjacent(segments), **out}
