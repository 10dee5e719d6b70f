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

Data is data: text inside a record that spells a control token (`<|im_end|>\n<|im_start|>system`)
must not become one, or a record could forge turns. Such spans are found with transformers'
own rule (`sanitize_control_tokens`: the tokenizer's special tokens and the added tokens the
template writes), marked before rendering, and come out as segments of their own with
`"literal": true`, which tokenization encodes as ordinary text
(`tokenization.special_tokens_in_content`). Rows without such text render exactly as before.

Nothing rendered depends on the day: templates that print a date (Llama 3.x: "Today Date: 26 Jul
2024"; SmolLM3, gpt-oss through `strftime_now`) see `template.date`, passed as `date_string` and
returned by `strftime_now` while rendering (`render_chat`). The real clock would change the
texts, the tokens and the run fingerprint every day.

Which template: `template.chat_template: auto` (the default) takes the tokenizer's own chat
template, and for a base model whose tokenizer has none the built-in `plain` layout: each prompt
followed directly by its reply and EOS, a system message as a preamble. A single prompt/reply pair
is then exactly prompt + completion + EOS, the way prompt/completion strings are joined for base
models (`render_prompt_completion`), so the trainer and the pipeline see the same text.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from sft_pipeline.common.config import DEFAULT_TEMPLATE_DATE, TemplateConfig
from sft_pipeline.common.errors import UserError
from sft_pipeline.data import images, tool_support

log = logging.getLogger(__name__)

SHIPPED_FOLDER = "templates"  # next to this module: the built-in `.jinja` templates
BUILTIN_TEMPLATES = ("chatml", "hermes", "alpaca", "plain")
# The probe conversation whose rendering shows what a template writes after an assistant reply.
_PROBE_REPLY = "Probe reply 7f3a."
# The layout `auto` falls back to when the tokenizer has no chat template (a base model).
FALLBACK_TEMPLATE = "plain"


class ChatTemplateError(UserError, ValueError):
    """A chat template is missing, cannot render a conversation, or is not prefix-preserving."""


Segment = dict[str, Any]


def tokenizer_template(tokenizer) -> str | None:
    """The tokenizer's own chat template (the default one of several named), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is for chat
        template = template.get("default")
    return template or None


def builtin_template(name: str) -> str:
    source = resources.files(__package__) / SHIPPED_FOLDER / f"{name}.jinja"
    return source.read_text(encoding="utf-8")


def local_template_files(cfg: TemplateConfig, root: Path) -> list[str]:
    """The `.jinja` file `template.chat_template` names, if any (a DVC dep of
    `render_conversations`; the shipped templates in SHIPPED_FOLDER are one too, always: `auto`
    falls back to one of them for a tokenizer without a chat template)."""
    choice = cfg.chat_template
    return [] if choice in ("auto", "tokenizer", *BUILTIN_TEMPLATES) else [choice]


def resolve_template(tokenizer, cfg: TemplateConfig) -> tuple[str, str]:
    """Return (template source, human-readable name) for `cfg.chat_template`."""
    choice = cfg.chat_template
    if choice in ("auto", "tokenizer"):
        template = tokenizer_template(tokenizer)
        if template:
            return template, f"the chat template of tokenizer {tokenizer.name_or_path!r}"
        if choice == "tokenizer":
            raise ChatTemplateError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; set "
                "template.chat_template to 'auto' (the plain layout for base models), "
                "'chatml', 'hermes' (with tools) or 'alpaca', or to the path of a .jinja file"
            )
        return builtin_template(FALLBACK_TEMPLATE), (
            f"built-in template {FALLBACK_TEMPLATE!r} (tokenizer {tokenizer.name_or_path!r} has "
            "no chat template: each prompt is followed directly by its reply and EOS)"
        )
    if choice in BUILTIN_TEMPLATES:
        return builtin_template(choice), f"built-in template {choice!r}"
    path = Path(choice)
    if not path.is_file():
        raise ChatTemplateError(
            f"template.chat_template: {choice!r} is not 'auto', 'tokenizer', "
            f"{' or '.join(repr(t) for t in BUILTIN_TEMPLATES)}, nor an existing .jinja file"
        )
    return path.read_text(encoding="utf-8"), f"template file {str(path)!r}"


def trained_template(tokenizer, cfg: TemplateConfig) -> tuple[str, str] | None:
    """(source, name) of the template the data is rendered with when it is not the tokenizer's
    own (a built-in, a file, or the fallback of `auto`), else None: what a merged tokenizer must
    carry so that the model is prompted the way it was trained."""
    if cfg.chat_template in ("auto", "tokenizer") and tokenizer_template(tokenizer):
        return None
    return resolve_template(tokenizer, cfg)


# How Llama 3.x templates write their `date_string` ("26 Jul 2024"), and their own default.
DATE_STRING_FORMAT = "%d %b %Y"


@contextlib.contextmanager
def pinned_clock(template: str, day: datetime.date) -> Iterator[None]:
    """While rendering `template`, its `strftime_now(format)` formats `day` (at 00:00:00).

    transformers compiles each template once into its own sandboxed environment (cached by
    the template text) with `strftime_now` reading the real clock as a global; a render
    argument cannot replace it (callables are turned into placeholders), so the global is
    swapped for the render and put back after, leaving other callers of that template alone.
    """
    from transformers.utils.chat_template_utils import _compile_jinja_template

    globals_ = _compile_jinja_template(template).environment.globals
    moment = datetime.datetime.combine(day, datetime.time())
    previous = globals_.get("strftime_now")
    globals_["strftime_now"] = moment.strftime
    try:
        yield
    finally:
        if previous is None:
            globals_.pop("strftime_now", None)
        else:
            globals_["strftime_now"] = previous


def render_chat(
    tokenizer,
    messages: list[dict[str, Any]],
    template: str,
    *,
    add_generation_prompt: bool,
    day: datetime.date = DEFAULT_TEMPLATE_DATE,
    **kwargs: Any,
) -> str:
    """`apply_chat_template` to text with the date pinned to `day` (module doc); `kwargs` go to
    the template (`tools=`)."""
    with pinned_clock(template, day):
        return tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            date_string=day.strftime(DATE_STRING_FORMAT),
            **kwargs,
        )


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether plain `tokenizer(text)` starts with BOS, i.e. the model was trained with one."""
    if tokenizer.bos_token is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _mark(value: Any, control: re.Pattern) -> Any:
    """Wrap the `control` tokens in every string of `value` in transformers' private-use markers
    (which are removed from the strings first, so data cannot forge a mark)."""
    from transformers.utils.chat_template_utils import mark_control_tokens

    if value is None:
        return None
    return mark_control_tokens(value, control)


def special_token_texts(tokenizer) -> list[str]:
    """Texts of special and added tokens, longest first (so `<|end|>` is not read as `<`...)."""
    texts = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return sorted((t for t in texts if t), key=len, reverse=True)


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
    ) -> str:
        # `tools` only when there are some: templates test `tools is defined` / `if tools`.
        extra = {"tools": tools} if tools else {}
        return render_chat(
            self.tokenizer,
            messages,
            self.template,
            add_generation_prompt=add_generation_prompt,
            day=self.cfg.date,
            **extra,
        )

    def row(
        self,
        messages: list[dict[str, Any]],
        text: str = "",
        supervise_from: int = 0,
        tools: list[dict[str, Any]] | None = None,
        *,
        marked: bool = False,
    ) -> dict[str, Any]:
        """Segments of one record; assistant turns before message `supervise_from` (those of a
        prompt given as messages) are rendered but not supervised. `tools`: the record's tool
        definitions (OpenAI shape), handed to the template.

        A record whose supervised turns call tools also gets `tool_call`: the prompt before the
        first such turn and the calls it makes (`{"name", "arguments"}`), for evaluation."""
        if not messages:
            return self._text_row(text)
        tools = tools or None
        control, markers = self._control_patterns(conversation=True)
        if not marked and any(control.search(t) for t in _strings([messages, tools])):
            row = self.row(
                _mark(messages, control), text, supervise_from, _mark(tools, control), marked=True
            )
            return _literal_row(row, markers)
        added = _with_system_prompt(messages, self.cfg.system_prompt)
        supervise_from += len(added) - len(messages)
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
            supervise_from = max(supervise_from - 1, 0)
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
        if tools or any(_is_tool_turn(m) for m in messages):
            self._check_tool_support(messages, tools, full)
        segments, call_prompt = self._conversation_segments(messages, full, supervise_from, tools)
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
            from transformers.utils.chat_template_utils import _get_control_token_patterns

            if conversation:
                tokens = tuple(self.tokenizer._get_control_tokens(self.template))
            else:
                tokens = tuple(
                    t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special
                )
            self._control[conversation] = _get_control_token_patterns(tokens)
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
            marked = _mark(body, control)
            return _literal_row(
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
        supervise_from: int = 0,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[list[Segment], tuple[str, list[dict[str, Any]]] | None]:
        """(segments, (prompt, calls) of the first supervised turn that calls tools or None)."""
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not any(i >= supervise_from for i in assistant_turns):
            raise ChatTemplateError("the conversation has no assistant turn to supervise")
        if assistant_turns[0] == 0:
            raise ChatTemplateError("the conversation starts with an assistant turn; no prompt")
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
                rendered, supervised = self._split_tool_turn(turn[len(prompt) :], i + 1)
                # Checked in the turn itself: a template that drops the calls may still show
                # the function names elsewhere (in the tool definitions).
                names = [c["function"]["name"] for c in calls]
                if absent := [n for n in names if n not in supervised]:
                    raise self._no_tool_support(
                        f"the tool calls are not rendered (message {i + 1} calls {absent[0]!r})"
                    )
                if call_prompt is None and i >= supervise_from:
                    call_prompt = (prompt, [dict(c["function"]) for c in calls])
            else:
                rendered, supervised = self._split_turn(
                    turn[len(prompt) :], content_text(messages[i]["content"])
                )
            segments.append({"text": supervised, "supervised": i >= supervise_from})
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
        if after.startswith(before):
            return
        at = next(
            (k for k, (a, b) in enumerate(zip(before, after, strict=False)) if a != b),
            min(len(before), len(after)),
        )
        raise ChatTemplateError(
            f"{self.name} is not prefix-preserving: rendering the first {n_messages} messages "
            f"{how} does not extend the previous rendering (they differ at character {at}: "
            f"{before[at : at + 30]!r} vs {after[at : at + 30]!r}), so assistant turns cannot "
            "be located reliably; use a prefix-preserving template (e.g. 'chatml' or a .jinja "
            "file)"
        )


def _with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None):
    if system_prompt and messages[0]["role"] != "system":
        parts = isinstance(messages[0]["content"], list)  # a conversation with images
        content = [{"type": "text", "text": system_prompt}] if parts else system_prompt
        return [{"role": "system", "content": content}, *messages]
    return messages


def content_text(content: Any) -> str:
    """The text of a message: string content as is, the text parts of parts content joined."""
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if p.get("type") == "text")
    return content


def merge_system_into_first_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold a leading system message into the first user turn (for templates without one)."""
    system, rest = messages[0], list(messages[1:])
    for k, message in enumerate(rest):
        if message["role"] != "user":
            continue
        if isinstance(message["content"], list):  # parts: the instruction as a first text part
            prefix = {"type": "text", "text": content_text(system["content"]) + "\n\n"}
            rest[k] = {**message, "content": [prefix, *message["content"]]}
        else:
            rest[k] = {**message, "content": f"{system['content']}\n\n{message['content']}"}
        return rest
    raise ChatTemplateError("a system message needs a user turn to merge into")


def _is_tool_turn(message: dict[str, Any]) -> bool:
    return message["role"] == "tool" or bool(message.get("tool_calls"))


def _last_assistant_content(messages: list[dict[str, Any]]) -> str:
    return next(content_text(m["content"]) for m in reversed(messages) if m["role"] == "assistant")


def _finish_row(segments: list[Segment], bos_text: str, reference: str) -> dict[str, Any]:
    text = "".join(s["text"] for s in segments)
    # The template may already start with BOS (Llama-2, Gemma); never add a second one.
    if bos_text and not text.startswith(bos_text):
        segments = [{"text": bos_text, "supervised": False}, *segments]
    segments = _merge_adjacent(segments)
    last_supervised = max(k for k, s in enumerate(segments) if s["supervised"])
    prompt = "".join(s["text"] for s in segments[:last_supervised])
    return {"segments": segments, "prompt": prompt, "reference": reference}


def _merge_adjacent(segments: Sequence[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for seg in segments:
        if not seg["text"]:
            continue
        kind = (seg["supervised"], seg.get("literal", False))
        if merged and (merged[-1]["supervised"], merged[-1].get("literal", False)) == kind:
            merged[-1] = {**merged[-1], "text": merged[-1]["text"] + seg["text"]}
        else:
            merged.append(dict(seg))
    return merged


def _strings(value: Any) -> Iterator[str]:
    """Every string value in nested lists and dicts (dict keys are names, not data)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _unmark(value: Any, markers: re.Pattern) -> Any:
    """`value` with marked control tokens back to their text and lone markers dropped."""
    if isinstance(value, str):
        return markers.sub(lambda m: m.group(1) or "", value)
    if isinstance(value, dict):
        return {key: _unmark(item, markers) for key, item in value.items()}
    if isinstance(value, list):
        return [_unmark(item, markers) for item in value]
    return value


def _literal_row(row: dict[str, Any], markers: re.Pattern) -> dict[str, Any]:
    """A row rendered from marked data: each marked control token becomes a segment of its
    own with `"literal": true` (its text, tokenized as text); everything else as rendered.

        [{"text": "<|im_start|>user\nhi \U000f0000<|im_end|>\U000f0001 there<|im_end|>...",
          "supervised": false}, ...]
     -> [{"text": "<|im_start|>user\nhi ", "supervised": false},
         {"text": "<|im_end|>", "supervised": false, "literal": true},
         {"text": " there<|im_end|>...", "supervised": false}, ...]

    A lone marker (a template's string method split a marked token apart) is dropped.
    """
    segments: list[Segment] = []
    for seg in row["segments"]:
        pieces = markers.split(seg["text"])
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                segments.append({"text": piece, "supervised": seg["supervised"]})
            elif piece:
                segments.append({"text": piece, "supervised": seg["supervised"], "literal": True})
    out = {key: _unmark(value, markers) for key, value in row.items() if key != "segments"}
    return {"segments": _merge_adjacent(segments), **out}


def render_prompt_completion(prompt: str, completion: str, tokenizer) -> dict:
    """Prompt and completion strings joined as they are, with no chat template: BOS (when the
    model uses one) + prompt + completion + EOS, the completion and its EOS supervised."""
    return Renderer(tokenizer, TemplateConfig()).prompt_completion_row(prompt, completion)
