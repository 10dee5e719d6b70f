"""The rows one record trains as: reasoning rendered by the model's own template, and every
trained turn's prompt exactly as the model is prompted with it at inference.

Reasoning. How a template takes an assistant's reasoning is probed once per renderer, by
rendering a probe conversation whose reasoning is a marker: under `reasoning_content` (Qwen3,
DeepSeek), under `thinking` (gpt-oss), or, for a template that reads neither but writes the
`<think>`/`</think>` tags itself (SmolLM3), inline at the start of the trained turn's content as
the model generates it. A template that renders reasoning none of these ways would train the
turn without it, so such a record stops the run naming the template; so does
`template.enable_thinking: false` on a record whose trained turn reasons (its prompt closes the
reasoning block). After rendering, every trained turn's reasoning must lie in the supervised
text: a record with reasoning is never trained without it.

Multi-turn (`template.multi_turn`). `whole`: one row, every trained assistant turn supervised;
this needs a prefix-preserving template, and is refused naming it otherwise. `per_turn`: one row
per trained assistant turn, holding the conversation up to that turn: its prompt is the
template's rendering of the history with the generation prompt, exactly what
`apply_chat_template(history, add_generation_prompt=True)` gives at inference (earlier turns'
reasoning rendered or dropped as the template does then); its reasoning, answer and end-of-turn
token are supervised. `last`: the last trained turn's row alone. `auto`: `whole` where the
template keeps earlier turns as it rendered them, else `per_turn`; also `per_turn` where
reasoning is written inline and an earlier turn reasons (at inference a client sends the
history back without it).

Per-turn control: an assistant message with `train: false` or `weight: 0` is context only
(`sft_pipeline.data.turns`); the control keys never reach the template.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from sft_pipeline.data.chat_templates import (
    ChatTemplateError,
    NotPrefixPreservingError,
    content_text,
)
from sft_pipeline.data.turns import (
    CONTROL_KEYS,
    INLINE_KEY,
    INLINE_TAGS,
    REASONING_KEY,
    is_trained,
    reasoning_of,
)

_PROBE_REASONING = "Reasoning probe 5c1e."


class ReasoningDroppedError(ChatTemplateError):
    """A trained turn's reasoning is missing from its supervised text."""


def reasoning_mode(renderer) -> str:
    """`reasoning_content`, `thinking`, `inline` or `none` (module doc), probed once."""
    if renderer.reasoning_mode is None:
        renderer.reasoning_mode = _probe(renderer)
    return renderer.reasoning_mode


def _probe(renderer) -> str:
    for key in (REASONING_KEY, "thinking"):
        probe = [
            {"role": "user", "content": "Probe question?"},
            {"role": "assistant", "content": "Probe answer.", key: _PROBE_REASONING},
        ]
        try:
            if _PROBE_REASONING in renderer.render(probe, False):
                return key
        except (TemplateError, ChatTemplateError, TypeError, ValueError, KeyError):
            continue
    return "inline" if all(tag in renderer.template for tag in INLINE_TAGS) else "none"


def record_rows(
    renderer, messages: list[dict[str, Any]], text: str = "", tools=None
) -> list[dict[str, Any]]:
    """The rows of one record (module doc); a text record is one row."""
    if not messages:
        return [renderer.row(messages, text, tools=tools)]
    cfg = renderer.cfg
    trained = [i for i, m in enumerate(messages) if m.get("role") == "assistant" and is_trained(m)]
    reasoned = [i for i in trained if reasoning_of(messages[i]).strip()]
    mode = reasoning_mode(renderer) if reasoned else None
    if reasoned and cfg.enable_thinking is False:
        raise ChatTemplateError(
            f"message {reasoned[0] + 1} has reasoning but template.enable_thinking is false: "
            f"{renderer.name}'s prompt closes the reasoning block, so the turn would be trained "
            "without it; set template.enable_thinking: true (or leave it unset)"
        )
    if mode == "none":
        raise ChatTemplateError(
            f"{renderer.name} renders no reasoning (it reads neither reasoning_content nor "
            f"thinking and writes no {INLINE_TAGS[0]} tags), so message {reasoned[0] + 1} would "
            "be trained without its reasoning; use a chat template that renders reasoning (the "
            "model's own where it does, or a .jinja file)"
        )
    multi = cfg.multi_turn
    if multi == "auto" and mode == "inline" and trained and reasoned[0] < trained[-1]:
        multi = "per_turn"
    if multi in ("auto", "whole"):
        whole = _prepared(messages, mode, inline=set(reasoned))
        try:
            row = renderer.row(whole, text, tools=tools, trained=frozenset(trained))
            return [_checked(renderer, row, messages, reasoned)]
        except (NotPrefixPreservingError, ReasoningDroppedError):
            if multi == "whole":
                raise
    turns = trained if multi in ("auto", "per_turn") else trained[-1:]
    return [_turn_row(renderer, messages, i, tools, mode) for i in turns]


def _turn_row(renderer, messages, i: int, tools, mode: str | None) -> dict[str, Any]:
    """The row of assistant turn `i`: the conversation up to it, only it supervised."""
    history = _prepared(messages[: i + 1], mode, inline={i})
    row = renderer.row(history, supervise_from=i, tools=tools, last_only=True)
    if mode == "inline":
        row["reference"] = content_text(messages[i]["content"])
    row["turn"] = i + 1
    return _checked(renderer, row, messages, [k for k in [i] if reasoning_of(messages[k]).strip()])


def _prepared(messages, mode: str | None, inline: set[int]) -> list[dict[str, Any]]:
    """Messages as the template takes them: control keys removed, reasoning under the key the
    template reads, or written into the content of the turns in `inline` (dropped elsewhere)."""
    out = []
    for k, message in enumerate(messages):
        message = {key: v for key, v in message.items() if key not in CONTROL_KEYS}
        reasoning = message.get(REASONING_KEY)
        if reasoning is not None and mode == "thinking":
            message["thinking"] = message.pop(REASONING_KEY)
        elif reasoning is not None and mode == "inline":
            message.pop(REASONING_KEY)
            if k in inline and isinstance(message.get("content"), str):
                message[INLINE_KEY] = reasoning
        out.append(message)
    return out


def _checked(renderer, row: dict[str, Any], messages, reasoned: list[int]) -> dict[str, Any]:
    """The row, once every trained turn's reasoning is found in its supervised text."""
    supervised = "".join(s["text"] for s in row["segments"] if s["supervised"])
    if reasoned:
        # Evaluation scores the answer alone and whether generations close their reasoning.
        row["reasoning"] = True
    for i in reasoned:
        if reasoning_of(messages[i]).strip() not in supervised:
            raise ReasoningDroppedError(
                f"{renderer.name} does not render the reasoning of message {i + 1} in its "
                "supervised turn, so it would be trained without it; use a chat template that "
                "renders reasoning for the turn it generates"
            )
    return row
