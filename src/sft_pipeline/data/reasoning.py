"""Reasoning as data: where a record's reasoning is, what makes it invalid, and which turns train.

An assistant's reasoning reaches the canonical record apart from its answer, as the message's
`reasoning_content`, whichever way the input wrote it: OpenAI/DeepSeek `reasoning_content`,
gpt-oss `thinking` (renamed by `sft_pipeline.data.turns`), or inline at the start of the content
between `data.reasoning_tags` (`<think>...</think>`, split off at ingestion by
`sft_pipeline.data.turns.split_inline_reasoning`).
How the chat template renders it (its own key, inline, or not at all) is decided at rendering
(`sft_pipeline.data.turn_rows`).

Per-turn control: `train: false` or `weight: 0` on an assistant message makes that turn context
only; any other weight (a finite number >= 0) scales that turn's loss (`sft_pipeline.data.
turn_rows` puts it on the turn's supervised text, tokenization carries it per token). A weight
that is negative, not finite or not a number is a reason, never trained at weight 1 silently.

The checks below are validation rules (`sft_pipeline.data.validation.RULES`); each returns one
reason per problem found.
"""

from __future__ import annotations

import math
from typing import Any

from sft_pipeline.data.conversation_checks import View, dict_turns, label, text_of
from sft_pipeline.data.turns import REASONING_KEY, is_trained, reasoning_of


def unclosed_tag(view: View, _cfg: Any = None) -> list[str]:
    opening, closing = view.get("reasoning_tags") or ("<think>", "</think>")
    return [
        f"{label(i, t)} opens its reasoning with {opening!r} and never closes it with {closing!r}"
        for i, t in dict_turns(view)
        if t.get("role") == "assistant"
        and isinstance(t.get("content"), str)
        and t["content"].lstrip().startswith(opening)
        and closing not in t["content"]
    ]


def outside_assistant(view: View, _cfg: Any = None) -> list[str]:
    return [
        f"{label(i, t)} carries reasoning ({REASONING_KEY}); only assistant turns reason"
        for i, t in dict_turns(view)
        if t.get("role") != "assistant" and t.get(REASONING_KEY) is not None
    ]


def empty_answer(view: View, _cfg: Any = None) -> list[str]:
    return [
        f"{label(i, t)} has reasoning but an empty answer after it"
        for i, t in dict_turns(view)
        if t.get("role") == "assistant"
        and reasoning_of(t).strip()
        and not (text_of(t.get("content")) or "").strip()
        and "tool_calls" not in t
    ]


def bad_control(view: View, _cfg: Any = None) -> list[str]:
    """`train` must be a boolean, `weight` a finite number >= 0 (module doc), and only on
    assistant turns."""
    problems = []
    for i, t in dict_turns(view):
        where = label(i, t)
        if "train" in t and not isinstance(t["train"], bool):
            problems.append(f"{where}: train is {t['train']!r}, expected true or false")
        weight = t.get("weight", 0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            problems.append(f"{where}: weight is {weight!r}, expected a number")
        elif not math.isfinite(weight) or weight < 0:
            problems.append(
                f"{where}: weight is {weight!r}, expected a finite number >= 0 (0: context "
                "only; any other scales the turn's loss)"
            )
        # Marking another turn context only is harmless (it never trains); weighting it is not
        # something rendering does (`training.roles_to_train` trains other roles at weight 1).
        elif t.get("role") != "assistant" and (t.get("train") is True or weight > 0):
            problems.append(f"{where}: only assistant turns train (train/weight)")
    return problems


def no_trained_turn(view: View, _cfg: Any = None) -> list[str]:
    assistant = [t for _, t in dict_turns(view) if t.get("role") == "assistant"]
    if assistant and not any(is_trained(t) for t in assistant):
        return ["every assistant turn is context only (train: false or weight: 0)"]
    return []
