"""Where generation stops, and what pads: one home for the end-of-turn, EOS and pad decisions.

The merge writes them into the merged model's `generation_config.json` (EOS plus the template's
end-of-turn token, a pad that is no EOS); evaluation, `kedro sft chat` and the GGUF/Ollama export
read them back from there with `stop_token_ids`, so all of them stop at the same tokens.
"""

from __future__ import annotations

import logging

from sft_pipeline.common.errors import UserError

log = logging.getLogger(__name__)

_PAD_CANDIDATES = (
    "<|endoftext|>",
    "<pad>",
    "<|pad|>",
    "[PAD]",
    "<|finetune_right_pad_id|>",
    "<unk>",
)
_ADDED_PAD = "<|pad|>"


class NoStopTokenError(UserError, ValueError):
    """The model defines no EOS token: generation would never stop."""


def configured_eos_ids(generation_config) -> list[int]:
    """`generation_config.eos_token_id` (an int, a list or None) as a list."""
    configured = getattr(generation_config, "eos_token_id", None)
    return [configured] if isinstance(configured, int) else list(configured or [])


def stop_token_ids(tokenizer, generation_config) -> list[int]:
    """The tokenizer's EOS first, then every other id generation stops at."""
    first = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = list(dict.fromkeys([*first, *configured_eos_ids(generation_config)]))
    if not ids:
        raise NoStopTokenError(
            "the model defines no EOS token (tokenizer eos_token, generation_config.json "
            "eos_token_id): generation would never stop"
        )
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """EOS plus the special token(s) the chat template puts after an assistant reply.

    Instruct models often end a turn with a token other than the tokenizer's EOS (`<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`); generation must stop there too, or it runs on into a
    hallucinated next turn.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not getattr(tokenizer, "chat_template", None):
        return ids
    marker = "sft-pipeline-reply-marker"
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": marker},
    ]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception as exc:  # a template may reject this minimal conversation; EOS still stops
        log.warning("chat template could not render a probe conversation (%s)", exc)
        return ids
    if marker not in text:
        return ids
    tail = text[text.rindex(marker) + len(marker) :]
    special = set(tokenizer.all_special_ids) | {
        i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special
    }
    for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special and token_id not in ids:
            ids.append(token_id)
    return ids


def choose_pad_token_id(tokenizer, eos_ids: list[int]) -> int | None:
    """An existing token that is not an EOS id nor written by the chat template, or None when a
    pad token must be added.

    A consumer that derives the attention mask from the pad id (`model.generate(input_ids)`
    without a mask, as many scripts call it) would mask every occurrence of the pad token in a
    prompt: padding with `<|im_start|>` would hide each turn's opening from the model.
    """
    vocab = tokenizer.get_vocab()
    candidates = [tokenizer.pad_token_id, tokenizer.unk_token_id]
    candidates += [vocab.get(name) for name in _PAD_CANDIDATES]
    # Other special tokens except BOS (padding with BOS would confuse models that look for it).
    candidates += sorted(set(tokenizer.all_special_ids) - {tokenizer.bos_token_id})
    templates = tokenizer.chat_template or ""
    template = "".join(templates.values()) if isinstance(templates, dict) else templates
    for token_id in candidates:
        if token_id is None or token_id in eos_ids:
            continue
        if tokenizer.convert_ids_to_tokens(token_id) not in template:
            return token_id
    return None


def configure_special_tokens(model, tokenizer) -> tuple[list[int], int]:
    """Set generation_config eos (end-of-turn included) and a non-EOS pad on model and tokenizer."""
    gen = model.generation_config
    existing = configured_eos_ids(gen)
    eos_ids = list(dict.fromkeys([*existing, *end_of_turn_ids(tokenizer)]))
    if not eos_ids:
        raise NoStopTokenError("neither the model nor the tokenizer defines an EOS token")
    pad_id = choose_pad_token_id(tokenizer, eos_ids)
    if pad_id is None:
        # Last resort: a new token changes the vocabulary, so the embeddings grow by one row.
        log.warning("no non-EOS token to pad with: adding %s and resizing embeddings", _ADDED_PAD)
        tokenizer.add_special_tokens({"pad_token": _ADDED_PAD})
        model.resize_token_embeddings(len(tokenizer))
        pad_id = tokenizer.pad_token_id
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    gen.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    gen.pad_token_id = pad_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = pad_id
    return eos_ids, pad_id
