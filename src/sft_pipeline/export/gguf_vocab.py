"""The tokenizer as GGUF metadata: vocabulary, merges or scores, token types, pre-tokenizer,
special ids, so llama.cpp rebuilds the tokenizer the merged model was trained with.

Two kinds, read from the fast tokenizer's own `tokenizer.json` (what transformers runs):

    byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM, Phi-2)   tokenizer.ggml.model = "gpt2"
        tokens, merges, the pre-tokenizer's split named as llama.cpp names it
    SentencePiece BPE (Llama 2, Mistral, Phi-3, Gemma)     tokenizer.ggml.model = "llama"
        tokens ("▁" for spaces, <0xNN> byte tokens), scores (-rank of the merge that makes the
        token: llama.cpp merges the best-scored pair first, as BPE merges the lowest rank),
        add_space_prefix (whether llama.cpp puts "▁" before text, see `space_prefix`)

Keys are written as llama.cpp's own converter writes them where that tokenizes as training did
(tests/export/test_gguf_reference.py compares both files): no add_space_prefix where llama.cpp's
SentencePiece default (prefix on) is right, an added special token typed CONTROL, no
add_eos_token when it is false. Ours differs on purpose in the scores (the converter gives every
token of a tokenizer.json vocabulary -1000) and writes add_bos_token from what training did.

llama.cpp applies the Jinja chat template stored next to them, so an exported file tokenizes
chat prompts exactly as the merged model's tokenizer does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sft_pipeline.export.check_prompts import prompt_texts
from sft_pipeline.export.errors import ExportError
from sft_pipeline.model.stop_tokens import stop_token_ids


def tokenizer_json(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast tokenizer (tokenizer.json)")
    return json.loads(backend.to_str())


# llama.cpp names the regex that splits text before byte-level BPE; these are the splits of the
# common families, as Hugging Face tokenizers spell them (Split + ByteLevel without its regex).
_PREFERRED_PRE_NAMES = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35")


def tokenizer_pre_type(tok_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer, or a refusal.

    A wrong pre-tokenizer name silently changes how llama.cpp splits text, so a split we cannot
    name is refused rather than guessed.
    """
    model = tok_json.get("model") or {}
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if model.get("type") != "BPE" or "ByteLevel" not in kinds:
        raise ExportError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM "
            f"style); this one is {model.get('type')} with pre-tokenizer {kinds}"
        )
    byte_level = steps[kinds.index("ByteLevel")]
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"  # llama.cpp's spelling; it refuses "gpt2" as an unknown pre-tokenizer
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and byte_level.get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                GGUF_PRE_TOKENIZER_SPLITS,
            )
        except ImportError:  # the table moved: refuse rather than guess
            GGUF_PRE_TOKENIZER_SPLITS = {}
        names = [n for n, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern]
        for name in (*_PREFERRED_PRE_NAMES, *names):
            if name in names:
                return name
    raise ExportError(
        f"GGUF export cannot name this tokenizer's pre-tokenizer ({kinds}) for llama.cpp; "
        "supported: GPT-2's byte-level split, SmolLM's digit split, and the Llama 3 / Qwen2 "
        "style regex splits"
    )


def _steps(part: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    part = part or {}
    return list(part.get(key) or []) if part.get("type") == "Sequence" else ([part] if part else [])


def sentencepiece_prefix(tok_json: dict[str, Any]) -> str | None:
    """For a SentencePiece-style BPE (byte fallback, "▁" for spaces): where transformers puts
    "▁" before text: "always" (at the start and after every special token), "first" (at the
    start of the input only) or "never"; None for any other tokenizer."""
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    normalizers = _steps(tok_json.get("normalizer"), "normalizers")
    pre = _steps(tok_json.get("pre_tokenizer"), "pretokenizers")
    metaspace = [p for p in pre if p.get("type") == "Metaspace"]
    replaces_space = any(
        n.get("type") == "Replace" and n.get("content") == "\u2581" for n in normalizers
    )
    if not metaspace and not replaces_space:
        return None
    if any(m.get("prepend_scheme") == "never" for m in metaspace):
        return "never"
    if any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in normalizers):
        return "always"
    if any(m.get("prepend_scheme", "always") == "always" for m in metaspace):
        return "always"
    return "first"


def space_prefix(tokenizer, scheme: str) -> bool:
    """llama.cpp's add_space_prefix for a SentencePiece tokenizer with prefix `scheme`.

    llama.cpp puts "▁" before the text and after every special token when the flag is on,
    never when it is off. "always" and "never" map onto it. "first" (how transformers 5 runs
    Llama-2, Mistral and Phi-3) puts it only at the start of the input, and training tokenizes
    a row as BOS (where the tokenizer adds one) + the rest on its own:

        prompt text               training's ids        flag
        <s>### Instruction ...    <s> ▁### Inst ...     on    (BOS split off, then plain text)
        <s>[INST] ...             <s> [ INST ...        off   (the template's BOS; a tokenizer
                                                               adding none does not split it)
        <|user|>\nWhat ...        <|user|> What ...     off   (a special token first)

    Decided by the merged model's prompt (its chat template, as the export check renders it):
    on when what training tokenizes as the start of its input (after a BOS it splits off)
    begins with plain text, off when with a special token. Plain text after a later special
    token (`</s>\n\n### Instruction` of a second turn) gets no "▁" in training and one in
    llama.cpp with the flag on: no flag says "first".
    """
    if scheme != "first":
        return scheme == "always"
    from sft_pipeline.data.templating import tokenizer_adds_bos

    try:
        text = prompt_texts(tokenizer)[0]
    except Exception as exc:  # a template error of any kind, from Jinja or the template
        raise ExportError(
            "GGUF export renders a prompt with the merged model's chat template to choose "
            f"llama.cpp's space prefix, and the template failed: {exc}"
        ) from exc
    if tokenizer_adds_bos(tokenizer) and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token) :]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return bool(ids) and ids[0] not in tokenizer.added_tokens_decoder


def check_tokenizer(tokenizer) -> str:
    """llama.cpp's tokenizer model ("gpt2" or "llama") for this tokenizer, or a refusal."""
    tok_json = tokenizer_json(tokenizer)
    if sentencepiece_prefix(tok_json) is not None:
        return "llama"
    tokenizer_pre_type(tok_json)
    return "gpt2"


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    model: str = "gpt2"
    scores: list[float] | None = None
    add_space_prefix: bool = True


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """Tokens by id (padded to the embedding rows), their kinds, merges and pre-tokenizer."""
    tok_json = tokenizer_json(tokenizer)
    if sentencepiece_prefix(tok_json) is not None:
        return sentencepiece_vocab(tokenizer, tok_json, vocab_size)
    return _byte_level_vocab(tokenizer, tok_json, vocab_size)


def _tokens_by_id(tokenizer, vocab_size: int) -> tuple[list[str], list[int], set[int]]:
    """(token texts, token types, ids the tokenizer's model holds) for every embedding row."""
    import gguf

    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(
            f"tokenizer has {len(vocab)} tokens but the model only {vocab_size} embedding rows"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    plain: set[int] = set()
    for token_id in range(vocab_size):
        if token_id not in by_id:
            # Embedding rows past the tokenizer (padded vocabularies) get placeholder names,
            # as llama.cpp requires one token per row.
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(added[token_id].content)
            special = added[token_id].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
            plain.add(token_id)
    return tokens, [int(t) for t in types], plain


def _merge_pairs(tok_json: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for merge in tok_json["model"].get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        pairs.append((pair[0], pair[1]))
    return pairs


def sentencepiece_vocab(tokenizer, tok_json: dict[str, Any], vocab_size: int) -> GGUFVocab:
    import gguf

    tokens, types, plain = _tokens_by_id(tokenizer, vocab_size)
    ids = {t: i for i, t in enumerate(tokens)}
    scores = [0.0] * vocab_size
    for rank, (left, right) in enumerate(_merge_pairs(tok_json)):
        token_id = ids.get(left + right)
        if token_id is not None and token_id in plain and scores[token_id] == 0.0:
            scores[token_id] = -float(rank + 1)
    unk = tok_json["model"].get("unk_token")
    for token_id in plain:
        text = tokens[token_id]
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[token_id] = int(gguf.TokenType.BYTE)
        elif text == unk:
            types[token_id] = int(gguf.TokenType.UNKNOWN)
    unk_id = tokenizer.unk_token_id
    if unk_id is not None and unk_id < vocab_size and unk_id not in tokenizer.added_tokens_decoder:
        # An added special <unk> stays CONTROL, as llama.cpp's converter types it.
        types[unk_id] = int(gguf.TokenType.UNKNOWN)
    for token_id in tokenizer.added_tokens_decoder:
        if token_id < vocab_size:
            scores[token_id] = -1000.0
    return GGUFVocab(
        tokens,
        types,
        [],
        "default",
        model="llama",
        scores=scores,
        add_space_prefix=space_prefix(tokenizer, sentencepiece_prefix(tok_json)),
    )


def _byte_level_vocab(tokenizer, tok_json: dict[str, Any], vocab_size: int) -> GGUFVocab:
    pre = tokenizer_pre_type(tok_json)
    tokens, types, _ = _tokens_by_id(tokenizer, vocab_size)
    merges = []
    for merge in tok_json["model"].get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if any(" " in part for part in pair):
            raise ExportError("GGUF export: a merge with a literal space cannot be written")
        merges.append(" ".join(pair))
    return GGUFVocab(tokens, types, merges, pre)


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


# --- tensors ------------------------------------------------------------------------------------


def add_tokenizer_metadata(writer, tokenizer, generation_config, vocab_size: int) -> None:
    from sft_pipeline.data.templating import tokenizer_adds_bos

    vocab = gguf_vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
        if not vocab.add_space_prefix:
            # Absent is on, llama.cpp's SentencePiece default (and its converter's file).
            writer.add_add_space_prefix(False)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    eos_ids = stop_token_ids(tokenizer, generation_config)
    writer.add_eos_token_id(eos_ids[0])
    if len(eos_ids) > 1:
        # llama.cpp stops at EOS and at the end-of-turn token the chat template writes.
        writer.add_eot_token_id(eos_ids[1])
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(tokenizer_adds_bos(tokenizer))
    # No add_eos_token: absent is false for both vocabulary types, as in the converter's file.
    template = _chat_template(tokenizer)
    if template:
        writer.add_chat_template(template)
