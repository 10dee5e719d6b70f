"""The pipeline's `Renderer` as the trainer uses it: per-row switches, reasoning kept per turn.

A dataset may carry a `chat_template_kwargs` column, a dict per row handed to the chat template
with that row only (`{"enable_thinking": False}` for Qwen3, a `reasoning_effort`, ...). Every
rendering of the row (each prefix the segments come from) sees the same switches, so its labels
follow the same rule as any other row's.

Reasoning templates (Qwen3) write an assistant turn's `<think>...</think>` block only while it
is the last turn and drop it from earlier ones, so a conversation with two assistant turns is not
prefix-preserving and the pipeline refuses it. The trainer then renders each assistant turn as
the model produced it, as the last turn, and joins the turns (what TRL's training variants of
these templates do by keeping the block in every turn):

    native:   user1 | A1           | user2 | <think></think> A2
    joined:   user1 | <think></think> A1 | user2 | <think></think> A2

Only rows the pipeline would refuse are joined; every other row renders exactly as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sft_pipeline.data.chat_templates import ChatTemplateError, content_text
from sft_pipeline.data.templating import Renderer

log = logging.getLogger(__name__)

ROW_KWARGS_COLUMN = "chat_template_kwargs"


class RowRenderer(Renderer):
    """`Renderer` whose renderings take the current row's template keyword arguments."""

    def __init__(self, tokenizer, cfg):
        super().__init__(tokenizer, cfg)
        self._row_kwargs: dict[str, Any] = {}
        self._joining = False
        self.joined_rows = 0

    @contextmanager
    def row_kwargs(self, row: dict[str, Any], name: str, index: int) -> Iterator[None]:
        kwargs = row.get(ROW_KWARGS_COLUMN)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(
                f"{name} row {index + 1}: {ROW_KWARGS_COLUMN} must be a dict of template "
                f"arguments, got {type(kwargs).__name__}"
            )
        # A column of dicts read through Arrow has every row's keys, None where a row has none.
        self._row_kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}
        try:
            yield
        finally:
            self._row_kwargs = {}

    def row(self, messages, *args, **kwargs):
        _refuse_turn_control(messages)
        try:
            return super().row(messages, *args, **kwargs)
        except ChatTemplateError as exc:
            if self._joining or "not prefix-preserving" not in str(exc):
                raise
        self._joining = True
        try:
            row = super().row(messages, *args, **kwargs)
        finally:
            self._joining = False
        if not self.joined_rows:
            log.info(
                "%s drops earlier assistant turns' reasoning blocks; each assistant turn is "
                "rendered as the last one and the turns joined",
                self.name,
            )
        self.joined_rows += 1
        return row

    def render(self, messages: list[dict], add_generation_prompt: bool, tools=None) -> str:
        """As the pipeline's `Renderer.render`, with this row's switches and joined turns."""
        if self._joining:
            return self._joined(messages, add_generation_prompt, tools)
        return self._native(messages, add_generation_prompt, tools)

    def _joined(self, messages, add_generation_prompt: bool, tools) -> str:
        """`messages` rendered with every assistant turn as it reads when it is the last one."""
        native = self._native(messages, add_generation_prompt, tools)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns or turns[0] == 0:
            return native
        last = turns[-1]
        prompt = self._native(messages[:last], True, tools)
        if not native.startswith(prompt):
            raise ChatTemplateError(
                f"{self.name} is not prefix-preserving even before assistant turn {last + 1} "
                "(its generation prompt does not start the rendering)"
            )
        if last == len(messages) - 1:
            return self._joined(messages[:last], True, tools) + native[len(prompt) :]
        # Messages follow the last assistant turn, which the template wrote as an earlier one:
        # keep what follows it, after the same turn written as the last one.
        tail = native[len(prompt) :]
        end = self._turn_end(tail, messages[last], last + 1)
        as_last = self._native(messages[: last + 1], False, tools)
        if not as_last.startswith(prompt):
            raise ChatTemplateError(
                f"{self.name} is not prefix-preserving within assistant turn {last + 1}"
            )
        turn = as_last[len(prompt) :]
        turn = turn[: self._turn_end(turn, messages[last], last + 1)]
        return self._joined(messages[:last], True, tools) + turn + tail[end:]

    def _turn_end(self, tail: str, message: dict[str, Any], number: int) -> int:
        content = content_text(message.get("content") or "").strip()
        at = tail.find(content) if content else -1
        if at < 0:
            raise ChatTemplateError(
                f"{self.name} is not prefix-preserving and message {number} (an assistant turn "
                "without verbatim content) cannot be located in the rendering"
            )
        end = at + len(content)
        gap = len(tail) - end - len(tail[end:].lstrip())
        for token in self.specials:
            if tail.startswith(token, end + gap):
                return end + gap + len(token)
        return end

    def _native(self, messages, add_generation_prompt: bool, tools) -> str:
        return super().render(messages, add_generation_prompt, tools, **self._row_kwargs)


def _refuse_turn_control(messages: list) -> None:
    """Per-turn `train`/`weight` keys change what trains; the trainer's rendering does not apply
    them, so a message that sets one is refused rather than trained as if it did not."""
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            continue
        if message.get("train", True) is not True or message.get("weight", 1) != 1:
            raise ValueError(
                f"message {i} sets train={message.get('train', True)!r}, "
                f"weight={message.get('weight', 1)!r}: per-turn control applies in the "
                "pipeline (data.path), not here; pass pre-tokenized rows with a loss_weights "
                "column (0 for context-only tokens), or drop the key"
            )
