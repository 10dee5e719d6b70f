"""Render canonical records into the exact strings the model sees, split into segments.

A rendered row is a list of segments `{"text", "supervised"}` whose concatenation is exactly the
model's input text (BOS included when the model expects one), so tokenization can use
`add_special_tokens=False` and derive labels from the supervised character spans.

Segment boundaries come from incremental prefix rendering, never from searching the text for a
response template (the source of TRL's "could not find response key" bugs): for each assistant
turn i we render `messages[:i]` with the generation prompt and `messages[:i+1]` without it, and
require each rendering to extend the previous one. A template that rewrites earlier turns when a
later one is added (not prefix-preserving) fails loudly, naming the template.

The supervised part of an assistant turn is everything after its generation prompt up to and
including the end-of-turn token that closes it (`<|im_end|>`, `<|end|>`, `</s>`, ...); what
follows that token (a newline, the next role header) is not supervised. A template whose turns
end without a special token gets the tokenizer's EOS text appended to each assistant turn, so the
model learns to stop.

Agent data: a record's tool definitions go to the template as `tools=` and assistant tool calls
as structured `tool_calls` (how `apply_chat_template` takes them). A turn that calls tools is
supervised like any assistant turn: everything after its generation prompt (the calls as the
template writes them, `<tool_call>{...}</tool_call>`, `{"name": ..., "parameters": ...}`, ...)
through its end-of-turn token. Tool results, tool definitions, system and user turns never are.
The end of such a turn is where the template's ordinary assistant turns end: the text a template
writes after an assistant reply (`<|im_end|>\n`, `<|eot_id|>`) is learnt once per template from a
probe conversation. A template that drops the tool definitions, the calls or the results (one
without tool support, such as plain ChatML) is refused, naming it, judged by comparing its
renderings with and without the tools and with markers in place of the results, never by
searching the text (`sft_pipeline.data.tool_support`); the built-in `hermes` template
renders tools the Hermes/Qwen2.5 way for models without a template of their own.

Reasoning, multi-turn rows and per-turn control are `sft_pipeline.data.turn_rows`'; control-token
text is data (`sft_pipeline.data.control_text`); which template renders, and with which date,
is `sft_pipeline.data.chat_templates`' answer.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from jinja2 import TemplateError

from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.data import images, tool_support
from sft_pipeline.data.chat_templates import (
    BUILTIN_TEMPLATES,
    DATE_STRING_FORMAT,
    FALLBACK_TEMPLATE,
    SHIPPED_FOLDER,
    ChatTemplateError,
    builtin_template,
    check_prefix,
    content_text,
    local_template_files,
    merge_system_into_first_user,
    pinned_clock,
    render_chat,
    resolve_template,
    tokenizer_adds_bos,
    tokenizer_template,
    trained_template,
    with_system_prompt,
)
from sft_pipeline.data.control_text import (
    literal_row,
    mark,
    merge_adjacent,
    special_token_texts,
    strings,
)
from sft_pipeline.data.turns import with_inline_reasoning

# Importers of rendering (the trainer, chat, merge, export) also find the template functions here.
__all__ = [
    "BUILTIN_TEMPLATES",
    "DATE_STRING_FORMAT",
    "FALLBACK_TEMPLATE",
    "SHIPPED_FOLDER",
    "ChatTemplateError",
    "Renderer",
    "builtin_template",
    "content_text",
    "local_template_files",
    "merge_system_into_first_user",
    "pinned_clock",
    "render_chat",
    "render_prompt_completion",
    "resolve_template",
    "tokenizer_adds_bos",
    "tokenizer_template",
    "trained_template",
]

log = logging.getLogger(__name__)
# The probe conversation whose rendering shows what a template writes after an assistant reply.
_PROBE_REPLY = "Probe reply 7f3a."


Segment = dict[str, Any]


class Renderer:
    """Renders conversations with one tokenizer and template; shared across records."""

    def __init__(self, tokenizer, cfg: TemplateConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self._template: tuple[str, str] | None = None
        self.bos_text = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""
        self.eos_text = tokenizer.eos_token
        self.specials = special_token_texts(tokenizer)
        self.system_merges = 0
        self._turn_suffix: str | None = None
        # How the template takes an assistant's reasoning, probed once (`turn_rows`).
        self.reasoning_mode: str | None = None
        # (control tokens, marked control tokens or lone markers) regexes, by what is rendered:
        # conversations (the template's control tokens) or text records (the special tokens).
        self._control: dict[bool, tuple[re.Pattern, re.Pattern]] = {}

    @property
    def template(self) -> str:
        # Resolved on first use: plain-text records need no template at all.
        if self._template is None:
            self._template = resolve_template(self.tokenizer, self.cfg)
            if self.cfg.chat_template == "auto" and not tokenizer_template(self.tokenizer):
                log.warning("conversations are rendered with %s", self._template[1])
        return self._template[0]

    @property
    def name(self) -> str:
        return self._template[1] if self._template else f"template {self.cfg.chat_template!r}"

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The conversation as the template renders it; `template_kwargs` go to the template
        (a row's own `chat_template_kwargs`, in the trainer)."""
        # `tools` only when there are some: templates test `tools is defined` / `if tools`.
        extra = {"tools": tools} if tools else {}
        if self.cfg.enable_thinking is not None:
            extra["enable_thinking"] = self.cfg.enable_thinking
        messages = with_inline_reasoning(messages)  # ours, after control text was marked
        return render_chat(
            self.tokenizer, messages, self.template, add_generation_prompt=add_generation_prompt,
            day=self.cfg.date, **extra, **template_kwargs,
        )  # fmt: skip

    def row(
        self,
        messages: list[dict[str, Any]],
        text: str = "",
        supervise_from: int = 0,
        tools: list[dict[str, Any]] | None = None,
        *,
        marked: bool = False,
        trained: frozenset[int] | None = None,
        last_only: bool = False,
    ) -> dict[str, Any]:
        """Segments of one record; assistant turns before message `supervise_from` (a prompt
        given as messages) or outside `trained` (indices) are context; `last_only`: only the last
        message's turn is located (`turn_rows`). `tools`: handed to the template.

        A record whose supervised turns call tools also gets `tool_call`: the prompt before the
        first such turn and the calls it makes (`{"name", "arguments"}`), for evaluation."""
        if not messages:
            return self._text_row(text)
        tools = tools or None
        control, markers = self._control_patterns(conversation=True)
        if not marked and any(control.search(t) for t in strings([messages, tools])):
            # Only what was asked is passed on: subclasses may override `row` without them.
            asked = trained is not None or last_only
            turns = {"trained": trained, "last_only": last_only} if asked else {}
            row = self.row(
                mark(messages, control),
                text,
                supervise_from,
                mark(tools, control),
                marked=True,
                **turns,
            )
            return literal_row(row, markers)
        added = with_system_prompt(messages, self.cfg.system_prompt)
        shift = len(added) - len(messages)
        messages = added
        try:
            full = self.render(messages, False, tools)
        except TemplateError as exc:
            if messages[0]["role"] != "system":
                raise ChatTemplateError(
                    f"{self.name} cannot render the conversation: {exc}"
                ) from exc
            # Gemma- and Mistral-style templates raise on a system role; keep the instruction by
            # prefixing it to the first user turn instead of dropping it.
            messages = merge_system_into_first_user(messages)
            shift -= 1
            try:
                full = self.render(messages, False, tools)
            except TemplateError as retry_exc:
                raise ChatTemplateError(
                    f"{self.name} cannot render the conversation, even with the system prompt "
                    f"merged into the first user turn: {retry_exc}"
                ) from retry_exc
            self.system_merges += 1
            log.debug(
                "%s raises on a system role (%s); merged it into the first user turn",
                self.name,
                exc,
            )
        if tools or any(tool_support.is_tool_turn(m) for m in messages):
            self._check_tool_support(messages, tools, full)
        supervised = {
            i + shift
            for i in range(max(supervise_from, -shift), len(messages) - shift)
            if trained is None or i in trained
        }
        segments, call_prompt = self._conversation_segments(
            messages, full, supervised, tools, last_only
        )
        row = _finish_row(segments, self.bos_text, _last_assistant_content(messages))
        if call_prompt is not None:
            prompt, calls = call_prompt
            if self.bos_text and not prompt.startswith(self.bos_text):
                prompt = self.bos_text + prompt
            row["tool_call"] = {"prompt": prompt, "reference": calls}
        pictures = images.image_parts(messages)
        if pictures:
            # In the order the template renders their placeholders; tokenization expands each.
            row["images"] = [images.source(p) for p in pictures]
        return row

    def _control_patterns(self, *, conversation: bool) -> tuple[re.Pattern, re.Pattern]:
        """(control tokens, marked control tokens or lone markers) regexes (module doc): for
        conversations the template's control tokens (its special tokens and the added tokens its
        text writes), for text records the special tokens."""
        if conversation not in self._control:
            from sft_pipeline.common.transformers_private import (
                control_token_patterns,
                template_control_tokens,
            )

            if conversation:
                tokens = template_control_tokens(self.tokenizer, self.template)
            else:
                tokens = tuple(
                    t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special
                )
            self._control[conversation] = control_token_patterns(tokens)
        return self._control[conversation]

    def _check_tool_support(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, full: str
    ) -> None:
        """Refuse a template that silently drops tool definitions or results, judged by the
        structure of its renderings (`sft_pipeline.data.tool_support`)."""
        problem = tool_support.problem(lambda m, t: self.render(m, False, t), messages, tools, full)
        if problem:
            raise self._no_tool_support(problem)

    def _no_tool_support(self, problem: str) -> ChatTemplateError:
        return ChatTemplateError(
            f"{self.name} cannot render tools: {problem}; use a chat template with tool "
            "support (the model's own where it has one, or template.chat_template: hermes)"
        )

    def _require_eos(self, what: str) -> str:
        if self.eos_text is None:
            raise ChatTemplateError(
                f"tokenizer {self.tokenizer.name_or_path!r} has no EOS token; {what} needs one "
                "to mark its end"
            )
        return self.eos_text

    def _text_row(self, text: str) -> dict[str, Any]:
        eos = self._require_eos("a text record")
        # Text that already ends with EOS keeps a single one.
        text = text if text.endswith(eos) else text + eos
        # All of a text record is data, except the EOS we append.
        control, markers = self._control_patterns(conversation=False)
        body, end = text[: -len(eos)], eos
        if control.search(body):
            marked = mark(body, control)
            return literal_row(
                _finish_row([{"text": marked + end, "supervised": True}], self.bos_text, ""),
                markers,
            )
        return _finish_row([{"text": text, "supervised": True}], self.bos_text, "")

    def prompt_completion_row(self, prompt: str, completion: str) -> dict[str, Any]:
        eos = self._require_eos("a completion")
        if not completion.endswith(eos):
            completion += eos
        segments = [
            {"text": prompt, "supervised": False},
            {"text": completion, "supervised": True},
        ]
        return _finish_row(segments, self.bos_text, completion[: -len(eos)])

    def _conversation_segments(
        self,
        messages: list[dict[str, Any]],
        full: str,
        supervised: set[int],
        tools: list[dict[str, Any]] | None = None,
        last_only: bool = False,
    ) -> tuple[list[Segment], tuple[str, list[dict[str, Any]]] | None]:
        """(segments, (prompt, calls) of the first supervised turn that calls tools or None)."""
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not any(i in supervised for i in assistant_turns):
            raise ChatTemplateError("the conversation has no assistant turn to supervise")
        if assistant_turns[0] == 0:
            raise ChatTemplateError("the conversation starts with an assistant turn; no prompt")
        if last_only:
            assistant_turns = assistant_turns[-1:]
        segments: list[Segment] = []
        call_prompt = None
        consumed = ""  # the template's rendering that the segments so far cover
        for i in assistant_turns:
            prompt = self.render(messages[:i], True, tools)
            self._check_prefix(consumed, prompt, i, "with the generation prompt")
            segments.append({"text": prompt[len(consumed) :], "supervised": False})
            # The last message's turn is the whole conversation, already rendered.
            turn = full if i + 1 == len(messages) else self.render(messages[: i + 1], False, tools)
            self._check_prefix(prompt, turn, i + 1, "without the generation prompt")
            calls = messages[i].get("tool_calls")
            if calls:
                rendered, supervised_text = self._split_tool_turn(turn[len(prompt) :], i + 1)
                # Checked in the turn itself: a template that drops the calls may still show
                # the function names elsewhere (in the tool definitions).
                names = [c["function"]["name"] for c in calls]
                if absent := [n for n in names if n not in supervised_text]:
                    raise self._no_tool_support(
                        f"the tool calls are not rendered (message {i + 1} calls {absent[0]!r})"
                    )
                if call_prompt is None and i in supervised:
                    call_prompt = (prompt, [dict(c["function"]) for c in calls])
            else:
                rendered, supervised_text = self._split_turn(
                    turn[len(prompt) :], content_text(messages[i]["content"])
                )
            segments.append({"text": supervised_text, "supervised": i in supervised})
            consumed = prompt + rendered
        self._check_prefix(consumed, full, len(messages), "without the generation prompt")
        segments.append({"text": full[len(consumed) :], "supervised": False})
        return segments, call_prompt

    @property
    def turn_suffix(self) -> str:
        """What the template writes after an assistant reply (`<|im_end|>\\n`, `<|eot_id|>`,
        "" for the plain layout), from rendering a probe conversation once."""
        if self._turn_suffix is None:
            probe = [
                {"role": "user", "content": "Probe question?"},
                {"role": "assistant", "content": _PROBE_REPLY},
            ]
            rendered = self.render(probe, False)
            if _PROBE_REPLY not in rendered:
                raise ChatTemplateError(
                    f"{self.name} does not render assistant content verbatim, so the end of a "
                    "turn that calls tools cannot be found"
                )
            self._turn_suffix = rendered[rendered.rindex(_PROBE_REPLY) + len(_PROBE_REPLY) :]
        return self._turn_suffix

    def _split_tool_turn(self, tail: str, n_messages: int) -> tuple[str, str]:
        """`_split_turn` for a turn that calls tools: the calls are not verbatim content, so its
        supervised part runs to where the template's ordinary assistant turns end."""
        body = tail.rstrip()
        suffix = self.turn_suffix.strip()
        if suffix:
            if not body.endswith(suffix):
                raise ChatTemplateError(
                    f"{self.name} ends the tool-calling turn of message {n_messages} "
                    f"({tail[-60:]!r}) unlike its other assistant turns ({suffix!r}), so its end "
                    "cannot be located"
                )
            body = body[: len(body) - len(suffix)]
        return self._close_turn(tail, len(body))

    def _split_turn(self, tail: str, content: str) -> tuple[str, str]:
        """Split a rendered assistant turn (after its generation prompt).

        Returns (the part of `tail` the supervised segment covers, the supervised text). They
        differ only when EOS text is appended because the turn ends without a special token.
        """
        stripped = tail.lstrip()
        lead = len(tail) - len(stripped)
        for candidate in (content, content.strip()):
            if candidate and stripped.startswith(candidate):
                end = lead + len(candidate)
                break
        else:
            # Text the template writes before the content and after the generation prompt
            # (Qwen3's empty `<think>\n\n</think>\n\n`) is generated by the model at inference,
            # so it is supervised with the content.
            at = tail.find(content.strip()) if content.strip() else -1
            end = at + len(content.strip()) if at >= 0 else -1
        if end < 0:
            raise ChatTemplateError(
                f"{self.name} does not render the assistant content verbatim after the "
                f"generation prompt (expected it to start {content[:40]!r}, rendered "
                f"{tail[:60]!r}); use a template that keeps assistant content as is"
            )
        return self._close_turn(tail, end)

    def _close_turn(self, tail: str, end: int) -> tuple[str, str]:
        """The turn's supervised part: `tail[:end]` and the special token that closes it (after
        whitespace), or EOS text appended when none does."""
        rest = tail[end:]
        gap = len(rest) - len(rest.lstrip())
        for token in self.specials:
            if rest.startswith(token, gap):
                end += gap + len(token)
                return tail[:end], tail[:end]
        if self.eos_text is None:
            raise ChatTemplateError(
                f"{self.name} ends assistant turns without a special token and tokenizer "
                f"{self.tokenizer.name_or_path!r} has no EOS token to append"
            )
        return tail[:end], tail[:end] + self.eos_text

    def _check_prefix(self, before: str, after: str, n_messages: int, how: str) -> None:
        check_prefix(self.name, before, after, n_messages, how)


def _last_assistant_content(messages: list[dict[str, Any]]) -> str:
    return next(content_text(m["content"]) for m in reversed(messages) if m["role"] == "assistant")


def _finish_row(segments: list[Segment], bos_text: str, reference: str) -> dict[str, Any]:
    text = "".join(s["text"] for s in segments)
    # The template may already start with BOS (Llama-2, Gemma); never add a second one.
    if bos_text and not text.startswith(bos_text):
        segments = [{"text": bos_text, "supervised": False}, *segments]
    segments = merge_adjacent(segments)
    last_supervised = max(k for k, s in enumerate(segments) if s["supervised"])
    prompt = "".join(s["text"] for s in segments[:last_supervised])
    return {"segments": segments, "prompt": prompt, "reference": reference}


def render_prompt_completion(prompt: str, completion: str, tokenizer) -> dict:
    """Prompt and completion strings joined as they are, with no chat template: BOS (when the
    model uses one) + prompt + completion + EOS, the completion and its EOS supervised."""
    return Renderer(tokenizer, TemplateConfig()).prompt_completion_row(prompt, completion)
