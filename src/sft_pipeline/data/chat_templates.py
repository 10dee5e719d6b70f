"""Which chat template renders the data, and rendering it with the day pinned.

Which template: `template.chat_template: auto` (the default) takes the tokenizer's own chat
template, and for a base model whose tokenizer has none the built-in `plain` layout: each prompt
followed directly by its reply and EOS, a system message as a preamble. A single prompt/reply pair
is then exactly prompt + completion + EOS, the way prompt/completion strings are joined for base
models (`render_prompt_completion`), so the trainer and the pipeline see the same text.

Nothing rendered depends on the day: templates that print a date (Llama 3.x: "Today Date: 26 Jul
2024"; SmolLM3, gpt-oss through `strftime_now`) see `template.date`, passed as `date_string` and
returned by `strftime_now` while rendering (`render_chat`). The real clock would change the
texts, the tokens and the run fingerprint every day.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from sft_pipeline.common.config import DEFAULT_TEMPLATE_DATE, TemplateConfig
from sft_pipeline.common.errors import UserError

SHIPPED_FOLDER = "templates"  # next to this module: the built-in `.jinja` templates
BUILTIN_TEMPLATES = ("chatml", "hermes", "alpaca", "plain")
# The probe conversation whose rendering shows what a template writes after an assistant reply.
_PROBE_REPLY = "Probe reply 7f3a."
# The layout `auto` falls back to when the tokenizer has no chat template (a base model).
FALLBACK_TEMPLATE = "plain"


class ChatTemplateError(UserError, ValueError):
    """A chat template is missing, cannot render a conversation, or is not prefix-preserving."""


class NotPrefixPreservingError(ChatTemplateError):
    """Adding a turn changes how the template renders the earlier ones (Qwen3 drops their
    reasoning), so one row cannot hold every turn as the model is prompted with it."""


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
    from sft_pipeline.common.transformers_private import compiled_template

    globals_ = compiled_template(template).environment.globals
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


# What a template is given: the configured system prompt, or the system message folded into
# the first user turn for templates that refuse a system role (Gemma, Mistral).


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None):
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


def check_prefix(name: str, before: str, after: str, n_messages: int, how: str) -> None:
    """Refuse a rendering of `n_messages` that does not extend the previous one (`before`)."""
    if after.startswith(before):
        return
    at = next(
        (k for k, (a, b) in enumerate(zip(before, after, strict=False)) if a != b),
        min(len(before), len(after)),
    )
    raise NotPrefixPreservingError(
        f"{name} is not prefix-preserving: rendering the first {n_messages} messages "
        f"{how} does not extend the previous rendering (they differ at character {at}: "
        f"{before[at : at + 30]!r} vs {after[at : at + 30]!r}), so assistant turns cannot "
        "be located reliably in one row; use template.multi_turn: per_turn (one row per "
        "assistant turn, each prompted as at inference) or a prefix-preserving template"
    )
