"""What makes a conversation invalid: the checks behind validation's conversation rules.

Each check takes a record's view (below) and the validation parameters and returns one reason
per problem found, empty when the record passes; `sft_pipeline.data.validation` names each check
by its reason code in its `RULES` table. Tool checks live in `sft_pipeline.data.tool_checks`,
image checks in `sft_pipeline.data.image_checks`, refused values in
`sft_pipeline.data.value_checks`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sft_pipeline.common.config import ValidationConfig
from sft_pipeline.data import image_checks, images, value_checks
from sft_pipeline.data.records import NOT_JSON

ROLES = ("system", "user", "assistant", "tool")

# A record as the rules see it: {"format": str, "turns": parsed messages, "text": str,
# "tools": parsed tool definitions or None, "image_problems": what is wrong with its images,
# checked once (file, decoding, size limits)}.
View = dict[str, Any]


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict) and NOT_JSON in value:  # stored tagged: bytes, ...
        return value_checks.type_name(value)
    names = {dict: "object", list: "list", str: "string", bool: "boolean"}
    return names.get(type(value), type(value).__name__)


def dict_turns(view: View) -> list[tuple[int, dict[str, Any]]]:
    """(1-based position, turn) for every turn that is an object; other shapes have own rules.
    Found once per record (most rules ask) and kept in the view; read it, never change it."""
    found = view.get(_DICT_TURNS)
    if found is None:
        turns = view["turns"]
        found = (
            [(i, t) for i, t in enumerate(turns, 1) if isinstance(t, dict)]
            if isinstance(turns, list)
            else []
        )
        view[_DICT_TURNS] = found
    return found


_DICT_TURNS = "_dict_turns"


def label(i: int, turn: dict[str, Any]) -> str:
    return f"message {i} ({turn.get('role')})"


def bad_messages(view: View, _cfg: ValidationConfig) -> list[str]:
    if isinstance(view["turns"], list):
        return []
    return [f"messages is not a list of {{role, content}} objects (got {type_name(view['turns'])})"]


def bad_turn(view: View, _cfg: ValidationConfig) -> list[str]:
    turns = view["turns"] if isinstance(view["turns"], list) else []
    return [
        f"message {i} is not an object with role and content (got {type_name(t)})"
        for i, t in enumerate(turns, 1)
        if not isinstance(t, dict)
    ]


def content_not_string(view: View, _cfg: ValidationConfig) -> list[str]:
    problems = []
    for i, t in dict_turns(view):
        content = t.get("content")
        if isinstance(content, str):
            continue
        if _has_images(view) and isinstance(content, list):
            # A conversation with images has parts: text parts hold strings, image parts images.
            problems.extend(
                f"{label(i, t)}: part {k} is not a text or image part (got {_part_name(p)})"
                for k, p in enumerate(content, 1)
                if not _is_text_part(p) and not _is_image_part(p)
            )
            continue
        problems.append(f"{label(i, t)}: content is not a string (got {type_name(content)})")
    return problems


def _has_images(view: View) -> bool:
    return bool(images.image_parts(view["turns"]))


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def _part_name(part: Any) -> str:
    return f"type {part.get('type')!r}" if isinstance(part, dict) else type_name(part)


def text_of(content: Any) -> str | None:
    """The text of string or parts content (None when neither)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if _is_text_part(p))
    return None


def empty_content(view: View, _cfg: ValidationConfig) -> list[str]:
    # A turn that calls tools may say nothing besides the calls.
    return [
        f"{label(i, t)} is empty after stripping"
        for i, t in dict_turns(view)
        if (text := text_of(t.get("content"))) is not None
        and not text.strip()
        and "tool_calls" not in t
        and not (isinstance(t["content"], list) and any(map(_is_image_part, t["content"])))
        # An answer missing after reasoning has its own reason (`empty_answer`).
        and not (
            t.get("role") == "assistant" and (text_of(t.get("reasoning_content")) or "").strip()
        )
    ]


def image_count(view: View, _cfg: ValidationConfig) -> list[str]:
    parts = images.image_parts(view["turns"])
    placeholders = sum(1 for p in parts if p.get("placeholder", True))
    found = sum(1 for p in parts if any(p.get(k) for k in images.SOURCE_KEYS) or "given" in p)
    if placeholders == found:
        return []
    return [f"the conversation has {placeholders} image placeholder(s) but {found} image(s)"]


def image_missing(view: View, _cfg: ValidationConfig) -> list[str]:
    return [p for p in view["image_problems"] if image_checks.is_missing(p)]


def image_unreadable(view: View, _cfg: ValidationConfig) -> list[str]:
    return [p for p in view["image_problems"] if not image_checks.is_missing(p)]


def image_not_in_user_turn(view: View, _cfg: ValidationConfig) -> list[str]:
    return [
        f"{label(i, t)} holds an image; images belong to user (or system) turns"
        for i, t in dict_turns(view)
        if t.get("role") == "assistant"
        and isinstance(t.get("content"), list)
        and any(_is_image_part(p) for p in t["content"])
    ]


def unknown_role(view: View, _cfg: ValidationConfig) -> list[str]:
    return [
        f"message {i} has unknown role {t.get('role')!r}; expected one of {', '.join(ROLES)}"
        for i, t in dict_turns(view)
        if t.get("role") not in ROLES
    ]


def calls_tools(turn: dict[str, Any]) -> bool:
    return turn.get("role") == "assistant" and "tool_calls" in turn


def not_alternating(view: View, _cfg: ValidationConfig) -> list[str]:
    """User and assistant alternate after one optional system message; an assistant turn that
    calls tools is followed by their results (`tool` turns), and those by the assistant."""
    # Unknown roles are reported by their own rule, and so are tool results that answer no call
    # (`orphan_tool_result`); the order is judged on the rest.
    known = [(i, t) for i, t in dict_turns(view) if t.get("role") in ROLES]
    problems = []
    if known and known[0][1]["role"] == "system":
        known = known[1:]
    expected = ("user",)
    for i, turn in known:
        role = turn["role"]
        if role == "system":
            problems.append(f"message {i} is a system message; only one, first, is allowed")
            continue
        if role == "tool" and "tool" not in expected:
            continue
        if role not in expected:
            if expected[0] == "tool":
                problems.append(
                    f"message {i} ({role}) where the result of the tool call before it was "
                    "expected (a `tool` message answers each call)"
                )
            else:
                problems.append(
                    f"message {i} ({role}) where {' or '.join(expected)} was expected "
                    "(turns alternate user/assistant after one optional system message)"
                )
        if role == "user":
            expected = ("assistant",)
        elif role == "assistant":
            expected = ("tool",) if calls_tools(turn) else ("user",)
        else:
            expected = ("tool", "assistant")
    return problems


def missing_turn(role: str) -> Callable[[View, ValidationConfig], list[str]]:
    def rule(view: View, _cfg: ValidationConfig) -> list[str]:
        if view["format"] == "text" or not isinstance(view["turns"], list):
            return []
        if any(t.get("role") == role for _i, t in dict_turns(view)):
            return []
        return [f"the conversation has no {role} message"]

    return rule


no_user_turn = missing_turn("user")
no_assistant_turn = missing_turn("assistant")


def last_not_assistant(view: View, cfg: ValidationConfig) -> list[str]:
    turns = view["turns"]
    if not cfg.require_assistant_last or not isinstance(turns, list) or not turns:
        return []
    last = turns[-1]
    if isinstance(last, dict) and last.get("role") == "assistant":
        return []
    role = last.get("role") if isinstance(last, dict) else type_name(last)
    return [f"the last message ({len(turns)}, {role}) is not the assistant's"]


def empty_text(view: View, _cfg: ValidationConfig) -> list[str]:
    if view["format"] != "text" or view["text"].strip():
        return []
    return ["text is empty after stripping (or not a string)"]


def too_long(view: View, cfg: ValidationConfig) -> list[str]:
    turns = view["turns"] if isinstance(view["turns"], list) else []
    # An assistant's reasoning is rendered too (Qwen3's <think> block).
    chars = len(view["text"]) + sum(
        len(text_of(t.get("content")) or "") + len(text_of(t.get("reasoning_content")) or "")
        for t in turns
        if isinstance(t, dict)
    )
    # Tool calls and tool definitions are rendered into the text as well.
    chars += sum(
        len(json.dumps(t["tool_calls"])) for t in turns if isinstance(t, dict) and calls_tools(t)
    )
    if view["tools"] is not None:
        chars += len(json.dumps(view["tools"]))
    if chars <= cfg.max_chars:
        return []
    return [f"{chars} characters, over validation.max_chars={cfg.max_chars}"]
