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
(`sft_pipeline.data.turns`); the control keys never reach the template. Any other weight goes on
the turn's supervised segments as `"weight"` (absent: 1), which tokenization turns into a
per-token loss weight; a row's supervised runs are its trained turns, in order.

Other roles (`training.roles_to_train`, e.g. `[assistant, user]`): a turn of such a role trains
with the trained assistant turn it leads to (in the row of that turn, so each trains once); its
content and the control token that closes it are supervised (`<|im_end|>`, `<|eot_id|>`), its
header is not. The content is located by rendering the row again with it between two
private-use markers, never by searching the text: where the template renders the marked
conversation differently (it tests or rewrites that content), the row is refused naming it.

    <|im_start|>user\n  Hi<|im_end|>   \n<|im_start|>assistant\n  Hello.<|im_end|>  \n
    prompt               supervised      prompt                     supervised     (rest)
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any

from jinja2 import TemplateError

from sft_pipeline.data.chat_templates import (
    ChatTemplateError,
    NotPrefixPreservingError,
    content_text,
)
from sft_pipeline.data.control_text import strings
from sft_pipeline.data.turns import (
    CONTROL_KEYS,
    INLINE_KEY,
    INLINE_TAGS,
    REASONING_KEY,
    is_trained,
    reasoning_of,
)

_PROBE_REASONING = "Reasoning probe 5c1e."
# Brackets around the content of a turn of another trained role while it is located (module
# doc): private-use code points, which the marked rendering must give back in pairs.
_OPEN, _CLOSE = "\U0010fff0", "\U0010fff1"
_MARKERS = re.compile(f"([{_OPEN}{_CLOSE}])")


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
    renderer,
    messages: list[dict[str, Any]],
    text: str = "",
    tools=None,
    roles: Sequence[str] = ("assistant",),
) -> list[dict[str, Any]]:
    """The rows of one record (module doc); a text record is one row. `roles`: the roles whose
    turns train (`training.roles_to_train`)."""
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
    others = set(roles) - {"assistant"}
    if multi in ("auto", "whole"):
        whole = _prepared(messages, mode, inline=set(reasoned))

        def render(prepared):
            return renderer.row(prepared, text, tools=tools, trained=frozenset(trained))

        try:
            row = _checked(renderer, render(whole), messages, reasoned)
        except (NotPrefixPreservingError, ReasoningDroppedError):
            if multi == "whole":
                raise
        else:
            leading = _leading_turns(messages, 0, trained[-1], others)
            return [_supervised(renderer, row, messages, trained, leading, whole, render)]
    turns = trained if multi in ("auto", "per_turn") else trained[-1:]
    # A row per turn supervises the turns after the trained turn before it.
    starts = {i: max((t + 1 for t in trained if t < i), default=0) for i in turns}
    return [
        _turn_row(
            renderer, messages, i, tools, mode, _leading_turns(messages, starts[i], i, others)
        )
        for i in turns
    ]


def _turn_row(renderer, messages, i: int, tools, mode, leading: list[int]) -> dict[str, Any]:
    """The row of assistant turn `i`: the conversation up to it, only it (and the turns of
    other trained roles in `leading`) supervised."""
    history = _prepared(messages[: i + 1], mode, inline={i})

    def render(prepared):
        return renderer.row(prepared, supervise_from=i, tools=tools, last_only=True)

    row = render(history)
    if mode == "inline":
        row["reference"] = content_text(messages[i]["content"])
    row["turn"] = i + 1
    row = _checked(renderer, row, messages, [k for k in [i] if reasoning_of(messages[k]).strip()])
    return _supervised(renderer, row, messages, [i], leading, history, render)


def _leading_turns(messages, start: int, i: int, roles: set[str]) -> list[int]:
    """The turns of `roles` from `start` up to trained assistant turn `i` (module doc), but
    those marked context only."""
    return [
        k for k in range(start, i) if messages[k].get("role") in roles and is_trained(messages[k])
    ]


def _supervised(
    renderer,
    row: dict[str, Any],
    messages,
    turns: list[int],
    leading: list[int],
    prepared: list[dict[str, Any]],
    render: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> dict[str, Any]:
    """`row` with each trained assistant turn's weight on its supervised run and the turns in
    `leading` supervised (module doc); as rendered where neither applies."""
    weights = [messages[i].get("weight", 1) for i in turns]
    if any(w != 1 for w in weights):
        runs: list[list[int]] = []
        for k, seg in enumerate(row["segments"]):
            if seg["supervised"]:
                if k == 0 or not row["segments"][k - 1]["supervised"]:
                    runs.append([])
                runs[-1].append(k)
        if len(runs) != len(turns):
            raise ChatTemplateError(
                f"{renderer.name} writes trained turns with no text between them, so their "
                "weights cannot be told apart; give them the same weight"
            )
        segments = [dict(seg) for seg in row["segments"]]
        for run, weight in zip(runs, weights, strict=True):
            for k in run if weight != 1 else ():
                segments[k]["weight"] = float(weight)
        row = {**row, "segments": segments}
    if leading:
        spans = _located(renderer, row, prepared, leading, render)
        row = {**row, "segments": _with_spans(row["segments"], spans)}
    return row


def _located(renderer, row, prepared, leading: list[int], render) -> list[tuple[int, int]]:
    """Character spans, in the row's text, of the content of each turn in `leading` and the
    control token closing it, found by rendering it between markers (module doc)."""
    if any(_OPEN in s or _CLOSE in s for s in strings(prepared)):
        raise ChatTemplateError(
            f"the conversation holds one of the private-use characters {_OPEN!r}, {_CLOSE!r}, "
            "which locate the turns of training.roles_to_train; remove them from the data"
        )
    marked = [_marked(m) if k in leading else m for k, m in enumerate(prepared)]
    expected = sum(_OPEN in s for k in leading for s in strings(marked[k].get("content")))
    roles = "/".join(sorted({prepared[k]["role"] for k in leading}))
    refused = ChatTemplateError(
        f"{renderer.name} renders the {roles} turns differently once their content is located "
        "(it tests, repeats or rewrites that content), so they cannot be trained; leave "
        "training.roles_to_train at [assistant] for this template"
    )
    try:
        pieces = _MARKERS.split("".join(seg["text"] for seg in render(marked)["segments"]))
    except (ChatTemplateError, TemplateError) as exc:
        raise refused from exc
    text = "".join(pieces[::2])
    paired = pieces[1::2] == [_OPEN, _CLOSE] * expected
    if not paired or text != "".join(seg["text"] for seg in row["segments"]):
        raise refused
    bounds, at = [], 0
    for piece in pieces[:-1:2]:  # the text before each bracket
        at += len(piece)
        bounds.append(at)
    spans = []
    for start, end in zip(bounds[::2], bounds[1::2], strict=True):
        gap = end + len(text[end:]) - len(text[end:].lstrip())
        closing = next((t for t in renderer.specials if text.startswith(t, gap)), None)
        spans.append((start, gap + len(closing) if closing else end))
    return spans


def _marked(message: dict[str, Any]) -> dict[str, Any]:
    """`message` with the text of its content between the markers (whitespace around it
    outside them, so a template that trims the content renders the same text)."""

    def mark(text: str) -> str:
        core = text.strip()
        if not core:
            return text
        at = text.index(core)
        return f"{text[:at]}{_OPEN}{core}{_CLOSE}{text[at + len(core) :]}"

    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": mark(content)}
    if isinstance(content, list):
        parts = [
            {**p, "text": mark(p["text"])}
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            else p
            for p in content
        ]
        return {**message, "content": parts}
    return message


def _with_spans(segments: list[dict[str, Any]], spans) -> list[dict[str, Any]]:
    """`segments` cut at the spans' ends, the pieces inside a span supervised."""
    out, pos = [], 0
    for seg in segments:
        end = pos + len(seg["text"])
        cuts = sorted({pos, end, *(c for span in spans for c in span if pos < c < end)})
        for a, b in itertools.pairwise(cuts):
            piece = {**seg, "text": seg["text"][a - pos : b - pos]}
            if any(s <= a and b <= e for s, e in spans):
                piece["supervised"] = True
            out.append(piece)
        pos = end
    return out


_PREPARED_KEYS = (*CONTROL_KEYS, REASONING_KEY)


def _prepared(messages, mode: str | None, inline: set[int]) -> list[dict[str, Any]]:
    """Messages as the template takes them: control keys removed, reasoning under the key the
    template reads, or written into the content of the turns in `inline` (dropped elsewhere)."""
    if not any(key in m for m in messages for key in _PREPARED_KEYS):
        return messages  # the common case: nothing to move or remove (never mutated below)
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
    if not reasoned:
        return row
    supervised = "".join(s["text"] for s in row["segments"] if s["supervised"])
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
