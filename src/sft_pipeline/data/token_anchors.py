"""Which tokens a row's character values land on (`sft_pipeline.data.tokenization`'s labels and
loss weights): a token takes the value of its first non-whitespace character, or of its first
character when it is all whitespace.

Anchoring on the first non-whitespace character handles SentencePiece tokens whose offsets start
at the space they absorbed (`▁Paris` after `[/INST]`), byte-level BPE tokens such as `ĠParis`
after `Assistant: `, and added tokens that swallow the whitespace after them (Phi-3's `<|end|>`
covers `<|end|>\n`). A whole batch of rows is mapped in a few array operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

# A supervised segment's turn weight; tokens get it in the `LOSS_WEIGHTS` column.
WEIGHT_KEY = "weight"


def supervised_char_mask(segments: Sequence[dict[str, Any]]) -> tuple[str, np.ndarray]:
    """The joined text and a per-character flag (length len(text) + 1) of supervised text."""
    text = "".join(s["text"] for s in segments)
    return text, char_values(segments, len(text), bool)


def segment_value(segment: dict[str, Any]) -> float:
    """A segment's weight where it is supervised (1 unless it says), else 0."""
    return segment.get(WEIGHT_KEY, 1.0) if segment["supervised"] else 0.0


def char_values(segments: Sequence[dict[str, Any]], n: int, dtype) -> np.ndarray:
    """Per character of the `n` joined characters (and one past the end): its segment's
    `segment_value`, as `dtype` (bool: the supervised flag)."""
    values = np.zeros(n + 1, dtype=dtype)
    pos = 0
    for seg in segments:
        end = pos + len(seg["text"])
        if seg["supervised"]:
            values[pos:end] = segment_value(seg)
        pos = end
    return values


# str.isspace for every code point up to U+3000, the last whitespace character in Unicode.
_SPACE = np.array([chr(c).isspace() for c in range(0x3001)], dtype=bool)


def whitespace_mask(text: str) -> np.ndarray:
    """Per character of `text`: `str.isspace()`, computed over the code points at once."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return _SPACE[np.minimum(codes, len(_SPACE) - 1)] & (codes < len(_SPACE))


def token_supervision(
    text: str, char_mask: np.ndarray, offsets: Sequence[Sequence[int]] | np.ndarray
):
    """Per token: is it supervised (by its first non-whitespace character, see module doc)."""
    return token_values([text], [char_mask], [offsets])[0]


def token_values(
    texts: Sequence[str],
    char_values: Sequence[np.ndarray],
    offsets: Sequence[Sequence[Sequence[int]] | np.ndarray],
) -> list[np.ndarray]:
    """Per row, per token: the value (`char_values`: one per character and one past the end,
    as `supervised_char_mask` / `char_values` give) of the token's first non-whitespace
    character, or of its first character when it is all whitespace (module doc).

    All rows at once: their texts joined, each followed by one non-whitespace sentinel standing
    for its end, so a character's next non-whitespace character never lies in another row."""
    if not texts:
        return []
    joined = "\0".join(texts) + "\0"
    sizes = np.fromiter((len(t) + 1 for t in texts), np.int64, len(texts))  # with the sentinel
    starts = np.cumsum(sizes) - sizes
    ends = starts + sizes - 1
    is_space = whitespace_mask(joined)
    # next_solid[c] = index of the first non-whitespace character at or after c (a sentinel
    # at the latest); whitespace stands for its row's end, which nothing of the row lies past.
    row_end = np.repeat(ends, sizes)
    positions = np.where(is_space, row_end, np.arange(len(joined)))
    next_solid = np.minimum.accumulate(positions[::-1])[::-1]
    spans = [o if isinstance(o, np.ndarray) else _spans(o) for o in offsets]
    counts = [len(s) for s in spans]
    flat = np.concatenate(spans).reshape(-1, 2) if sum(counts) else np.zeros((0, 2), np.int64)
    shift = np.repeat(starts, counts)
    first, last = flat[:, 0] + shift, flat[:, 1] + shift
    anchor = next_solid[first]
    anchor = np.where(anchor < last, anchor, first)
    values = np.concatenate(char_values)
    # Each row's values sit at its characters' positions: the joined layout, one per character
    # and one for the end (the sentinel's place).
    picked = values[anchor]
    return np.split(picked, np.cumsum(counts)[:-1])


def _spans(offsets: Sequence[Sequence[int]]) -> np.ndarray:
    flat = chain.from_iterable(offsets)  # np.fromiter: ~3x faster than asarray on tuples
    return np.fromiter(flat, dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)
