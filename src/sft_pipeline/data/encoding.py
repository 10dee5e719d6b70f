"""Text to token ids and character offsets, exactly as the model sees it.

Texts are tokenized by the fast tokenizer with `add_special_tokens=False` (the text already holds
BOS where the model wants one, so there is never a double BOS), straight from its Rust backend
where it has one.

A row that starts with the tokenizer's BOS (which the rendered text holds exactly when the model
was trained with one) is tokenized as the BOS id followed by the rest of the text tokenized on its
own, i.e. what `tokenizer(rest)` gives: the ids the model saw in pretraining and sees when a user
calls the tokenizer on a prompt. Tokenizing the BOS text inline would differ for SentencePiece
tokenizers that mark a word start (`▁`) only at the start of the input (Llama-2 converted from its
`tokenizer.model`): the first word would lose its `▁` (`<s>What` instead of `<s>▁What`).

Text inside a record that spells a control token comes from rendering as segments with
`"literal": true` (`sft_pipeline.data.templating`). A literal row is encoded piece by piece: the
text between literal segments as usual, each literal segment with all of the tokenizer's added
tokens switched off (special or not); a piece after the first is encoded after a newline that is
then dropped, so SentencePiece does not add the word-start space it adds at the start of an input
(transformers' `encode_marked_chat` does the same). Offsets stay those of the whole text, so
labels follow the same character rule (`sft_pipeline.data.tokenization`).

A conversation row is trained on the ids the model is prompted with: its prompt (the text before
its first supervised segment) is encoded on its own, exactly as inference encodes it, and the
rest as a continuation (after a newline that is then dropped, as above), so no token straddles
the point where generation starts (`"</think>\n\n"` + `"4"` would otherwise merge differently
than the prompt alone, for byte-level BPE tokenizers).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np


def require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} is not a fast "
            "tokenizer; labels need offset mappings, which only fast (Rust) tokenizers give. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def encode_texts(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple]]]:
    """Token ids and character offsets of each text, a leading BOS split off (module doc)."""
    from sft_pipeline.data.templating import tokenizer_adds_bos

    bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""
    split = [bool(bos) and text.startswith(bos) for text in texts]
    inputs = [text[len(bos) :] if cut else text for text, cut in zip(texts, split, strict=True)]
    batch_ids, batch_offsets = _encode(tokenizer, inputs)
    ids, offsets = [], []
    for cut, row_ids, row_offsets in zip(split, batch_ids, batch_offsets, strict=True):
        if cut:
            n = len(bos)
            row_ids = [tokenizer.bos_token_id, *row_ids]
            row_offsets = [(0, n), *((start + n, end + n) for start, end in row_offsets)]
        ids.append(list(row_ids))
        offsets.append(list(row_offsets))
    return ids, offsets


def encode_prompted(
    tokenizer, texts: list[str], cuts: list[int]
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Like `encode_texts`, but each text whose prompt ends at character `cuts[k]` (0: none)
    is encoded as its prompt on its own, then the rest as a continuation (module doc): the
    prompt ids are exactly the ids inference feeds the model for that prompt. Offsets come back
    as one (tokens, 2) integer array per text, shifted into the whole text in one step."""
    ids, offsets = encode_texts(
        tokenizer, [t[:c] if c else t for t, c in zip(texts, cuts, strict=True)]
    )
    spans = _arrays(offsets)
    rest = [k for k, c in enumerate(cuts) if c]
    if not rest:
        return ids, spans
    newline = list(_encode(tokenizer, ["\n"])[0][0])
    n = len(newline)
    tails_ids, tails_offsets = _encode(tokenizer, ["\n" + texts[k][cuts[k] :] for k in rest])
    skip, shift = [0] * len(rest), [0] * len(rest)
    for j, k in enumerate(rest):
        if tails_ids[j][:n] == newline:
            skip[j], shift[j] = n, cuts[k] - 1
        else:  # the newline merged with the continuation's start: encode it on its own
            (tails_ids[j],), (tails_offsets[j],) = _encode(tokenizer, [texts[k][cuts[k] :]])
            shift[j] = cuts[k]
    for j, (k, tail) in enumerate(zip(rest, _arrays(tails_offsets), strict=True)):
        ids[k].extend(tails_ids[j][skip[j] :])
        spans[k] = np.concatenate([spans[k], tail[skip[j] :] + shift[j]])
    return ids, spans


def _arrays(offsets: list[list[tuple[int, int]]]) -> list[np.ndarray]:
    """Each row's offsets as a (tokens, 2) int64 array, converted for all rows at once."""
    lengths = [len(row) for row in offsets]
    flat = chain.from_iterable(chain.from_iterable(offsets))  # fromiter: faster than asarray
    spans = np.fromiter(flat, dtype=np.int64, count=2 * sum(lengths)).reshape(-1, 2)
    return np.split(spans, np.cumsum(lengths)[:-1]) if offsets else []


def _encode(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple]]]:
    """`tokenizer(texts, add_special_tokens=False)` ids and offsets, straight from the Rust
    backend when there is one: the same call transformers makes, with the same settings (no
    truncation, no padding, its `split_special_tokens`), without building a BatchEncoding."""
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    backend = getattr(tokenizer, "_tokenizer", None)
    setup = getattr(tokenizer, "set_truncation_and_padding", None)
    if backend is None or setup is None or not hasattr(backend, "encode_batch"):
        enc = tokenizer(
            texts,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            split_special_tokens=split_special,
        )
        return enc["input_ids"], enc["offset_mapping"]
    from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

    setup(
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        truncation_strategy=TruncationStrategy.DO_NOT_TRUNCATE,
        max_length=None,
        stride=0,
        pad_to_multiple_of=None,
        padding_side=None,
    )
    if backend.encode_special_tokens != split_special:
        backend.encode_special_tokens = split_special
    encodings = backend.encode_batch(texts, add_special_tokens=False, is_pretokenized=False)
    return [e.ids for e in encodings], [e.offsets for e in encodings]


def literal_texts(segments: Sequence[dict[str, Any]]) -> list[str]:
    """The control-token texts a row holds as data (its literal segments), each once."""
    return list(dict.fromkeys(s["text"] for s in segments if s.get("literal")))


def encode_literal_row(tokenizer, segments: Sequence[dict[str, Any]]) -> tuple[list, list]:
    """(ids, offsets) of a row with literal segments (module doc): the plain pieces as usual,
    the literal ones as text; offsets into the whole joined text (each token of a literal piece
    spans the whole piece, which is one control-token text in one segment)."""
    pieces: list[tuple[str, bool]] = []
    for seg in segments:
        literal = bool(seg.get("literal"))
        if pieces and not literal and not pieces[-1][1]:
            pieces[-1] = (pieces[-1][0] + seg["text"], False)
        else:
            pieces.append((seg["text"], literal))
    newline_ids = _encode(tokenizer, ["\n"])[0][0]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    start = 0
    for k, (text, literal) in enumerate(pieces):
        if literal:
            piece_ids = encode_as_text(tokenizer, text)
            piece_offsets = [(0, len(text))] * len(piece_ids)
        elif k == 0:
            (piece_ids,), (piece_offsets,) = encode_texts(tokenizer, [text])
        else:
            (piece_ids,), (piece_offsets,) = _encode(tokenizer, ["\n" + text])
            if list(piece_ids[: len(newline_ids)]) == list(newline_ids):
                piece_ids = piece_ids[len(newline_ids) :]
                piece_offsets = [(a - 1, b - 1) for a, b in piece_offsets[len(newline_ids) :]]
            else:  # the newline merged with the piece's start: encode it on its own
                (piece_ids,), (piece_offsets,) = _encode(tokenizer, [text])
        ids.extend(piece_ids)
        offsets.extend((start + max(a, 0), start + b) for a, b in piece_offsets)
        start += len(text)
    return ids, offsets


def encode_as_text(tokenizer, text: str) -> list[int]:
    """`text` from the middle of a row encoded as plain text: no added token is matched, special
    or not (a backend's `encode_special_tokens` still matches the non-special ones, such as
    Qwen's `<tool_call>`), and no word-start space is added (encoded after a newline that is
    then dropped, as in the module doc)."""
    encode = tokenizer._encode_without_added_tokens
    newline_ids, ids = encode("\n"), encode("\n" + text)
    if ids[: len(newline_ids)] == newline_ids:
        return ids[len(newline_ids) :]
    return encode(text)


def forged_reason(tokenizer, segments, ids, offsets) -> str | None:
    """Why a literal row still holds a control token inside a literal segment, or None (a
    tokenizer whose plain-text vocabulary produces the control token itself)."""
    spans, pos = [], 0
    for seg in segments:
        if seg.get("literal"):
            spans.append((pos, pos + len(seg["text"]), seg["text"]))
        pos += len(seg["text"])
    for a, b, text in spans:
        token = tokenizer.convert_tokens_to_ids(text)
        if any(t == token for t, (start, _end) in zip(ids, offsets, strict=True) if a <= start < b):
            return (
                f"the tokenizer turns the text {text!r} into its control token even as plain "
                "text, so it cannot be trained on literally"
            )
    return None
