"""The Ollama `Modelfile` of an exported model: FROM the GGUF, TEMPLATE, SYSTEM, stop tokens.

Ollama renders prompts with its own Go-template syntax, not Jinja, so the chat template is
translated for the layouts it can be checked against: a turn is a fixed prefix, the message and
a fixed suffix per role, then a generation prompt. The layout is recognised by rendering probe
conversations with the tokenizer's Jinja template, as training rendered prompts (the merged
folder's switches: `template.enable_thinking`, the date, the system prompt), and comparing them,
character for character, with the layout's own rendering. One that renders differently in any
probe gets no TEMPLATE, and the Modelfile and the log say which probe and why (llama.cpp itself
still applies the Jinja template from the GGUF). A probe sends back a reply with its reasoning
written inline, as the model generated it: a template that drops earlier replies' reasoning
(Qwen3) cannot be a fixed layout, since Ollama would keep it.

    ChatML:  <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n
    Phi-3:   <|{role}|>\\n{content}<|end|>\\n ... <|assistant|>\\n   (Phi-4: without the newlines)
    Alpaca:  {system}\\n\\n ### Instruction:\\n{user}\\n\\n ### Response:\\n{reply}{eos}\\n\\n ...
             ### Response:\\n

A template may add a default system prompt (the Modelfile's SYSTEM; the trained system prompt
when the run set one) or text after the generation prompt (an empty reasoning block with
`enable_thinking: false`); both are part of the layout the probes check.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.data.turns import INLINE_TAGS

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TurnLayout:
    """A chat format in which each message renders as prefix + content + suffix of its role."""

    name: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    # Inserted as the first message when a conversation has no system message of its own.
    default_system: str | None = None

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for `messages`, ending with the generation prompt (as a chat request)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        turns = "".join(
            self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages
        )
        return turns + self.generation_prompt

    def go_template(self) -> str:
        """The same rendering in Ollama's template syntax (`.Messages`, `.Role`, `.Content`).

        No `{{-` trimming: it would also eat the newlines that are part of the layout. A system
        message is supplied by Ollama from the Modelfile's SYSTEM when a request has none.
        """
        parts = ["{{ range .Messages }}"]
        for role in ROLES:
            parts.append(
                f'{{{{ if eq .Role "{role}" }}}}{self.prefix[role]}{{{{ .Content }}}}'
                f"{self.suffix[role]}{{{{ end }}}}"
            )
        parts.append("{{ end }}")
        parts.append(self.generation_prompt)
        return "".join(parts)


def chatml_layout() -> TurnLayout:
    return TurnLayout(
        name="chatml",
        prefix={r: f"<|im_start|>{r}\n" for r in ROLES},
        suffix={r: "<|im_end|>\n" for r in ROLES},
        generation_prompt="<|im_start|>assistant\n",
    )


def role_tag_layout(newline: bool) -> TurnLayout:
    """Phi-3's layout (`<|user|>\\n...<|end|>\\n`), or Phi-4's without the newlines."""
    nl = "\n" if newline else ""
    return TurnLayout(
        name="phi-3" if newline else "phi-4",
        prefix={r: f"<|{r}|>{nl}" for r in ROLES},
        suffix={r: f"<|end|>{nl}" for r in ROLES},
        generation_prompt=f"<|assistant|>{nl}",
    )


def alpaca_layout(eos_token: str) -> TurnLayout:
    """The built-in `alpaca` template (sft_pipeline/data/templates/alpaca.jinja) as a layout."""
    return TurnLayout(
        name="alpaca",
        prefix={"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"},
        suffix={"system": "\n\n", "user": "\n\n", "assistant": eos_token + "\n\n"},
        generation_prompt="### Response:\n",
    )


_PROBE_TEXTS = ("What is 2 + 2?", "4.", "And times 3?", "Be brief.", "Two and two make four.")


def _probes() -> list[tuple[str, list[dict[str, str]]]]:
    """(what it shows, conversation): each ends with a user turn; with and without system, one
    and two turns, and a reply whose reasoning is written at its start as the model generates
    it (a chat client sends the reply back so)."""
    q1, a1, q2, system, reasoning = _PROBE_TEXTS
    opening, closing = INLINE_TAGS
    user = [{"role": "user", "content": q1}]
    sys_msg = [{"role": "system", "content": system}]
    two_turns = [*user, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    reasoned = f"{opening}\n{reasoning}\n{closing}\n\n{a1}"
    after_reasoning = [*user, {"role": "assistant", "content": reasoned}, two_turns[-1]]
    return [
        ("a user turn", user),
        ("a system message", [*sys_msg, *user]),
        ("an earlier reply", two_turns),
        ("a system message and an earlier reply", [*sys_msg, *two_turns]),
        (f"an earlier reply that reasons in a {opening} block", after_reasoning),
    ]


def probe_conversations() -> list[list[dict[str, str]]]:
    """The probe conversations (`_probes`), in order."""
    return [messages for _, messages in _probes()]


# Why a layout cannot say what the template does, by the probe it first renders unlike it.
_CAUSES = {
    "a system message": "the template does not write a system message as a fixed prefix, the "
    "message and a fixed suffix",
    "an earlier reply": "the template does not write earlier turns as a fixed prefix, the "
    "message and a fixed suffix per role",
    "a system message and an earlier reply": "the template writes a system message and earlier "
    "turns unlike a fixed prefix and suffix per role",
    "reasons": "the template drops or moves the reasoning of earlier replies, as it did in "
    "training, which a TEMPLATE of a fixed prefix and suffix per role cannot express: it would "
    "keep the reply as the client sends it back",
}


def _with_default_system(layout: TurnLayout, rendered_user_only: str) -> TurnLayout:
    """The layout, plus the system prompt the template inserts when a conversation has none."""
    prefix, suffix = layout.prefix["system"], layout.suffix["system"]
    if prefix and rendered_user_only.startswith(prefix):
        end = rendered_user_only.find(suffix, len(prefix))
        system = rendered_user_only[len(prefix) : end]
        # A system block the template leaves unclosed would swallow the turns after it.
        if end > 0 and not any(p and p in system for p in layout.prefix.values()):
            return replace(layout, default_system=system)
    return layout


def _with_generation_prompt(layout: TurnLayout, user_only: list, rendered: str) -> TurnLayout:
    """The layout whose generation prompt ends with what the template writes after the layout's
    own (Qwen3 and SmolLM3 with `enable_thinking: false`: an empty reasoning block)."""
    own = layout.render(user_only)
    if rendered.startswith(own) and len(rendered) > len(own):
        return replace(layout, generation_prompt=layout.generation_prompt + rendered[len(own) :])
    return layout


def _variants(candidate: TurnLayout, rendered_user_only: str, system_prompt: str | None):
    """The candidate layout and what the template adds to it: its own default system prompt
    (the trained system prompt instead, when the run set one), text after the generation prompt."""
    if system_prompt:
        systems = [replace(candidate, default_system=system_prompt)]
    else:
        systems = [candidate, _with_default_system(candidate, rendered_user_only)]
    user_only = _probes()[0][1]
    out: list[TurnLayout] = []
    for layout in systems:
        for variant in (layout, _with_generation_prompt(layout, user_only, rendered_user_only)):
            if variant not in out:
                out.append(variant)
    return out


def translate(tokenizer, prompting: TemplateConfig | None = None) -> tuple[TurnLayout | None, str]:
    """(the layout whose rendering equals the chat template's on every probe, or None; why none).

    The chat template renders as training rendered prompts: with the switches of `prompting`
    (`template.enable_thinking`, the date, the system prompt; `export/prompting.py`)."""
    from sft_pipeline.data.templating import Renderer, tokenizer_template
    from sft_pipeline.export.prompting import render_prompt

    if not tokenizer_template(tokenizer):
        return None, "the model has no chat template"
    cfg = prompting or TemplateConfig(chat_template="tokenizer")
    renderer = Renderer(tokenizer, cfg)
    probes = _probes()
    rendered = []
    for what, messages in probes:
        try:
            rendered.append(render_prompt(renderer, messages))
        except Exception as exc:  # a template may reject a probe (e.g. no system role)
            return None, f"the chat template cannot render {what} ({' '.join(str(exc).split())})"
    candidates = [chatml_layout(), role_tag_layout(newline=True), role_tag_layout(newline=False)]
    if tokenizer.eos_token:
        candidates.append(alpaca_layout(tokenizer.eos_token))
    nearest: tuple[tuple[int, int], TurnLayout, str] | None = None
    for candidate in candidates:
        for layout in _variants(candidate, rendered[0], cfg.system_prompt):
            texts = [layout.render(m) for _, m in probes]
            failed = next(
                (k for k, (a, b) in enumerate(zip(texts, rendered, strict=True)) if a != b), None
            )
            if failed is None:
                fixed = [*layout.prefix.values(), *layout.suffix.values(), layout.generation_prompt]
                if "{{" in "".join(fixed):
                    return None, f"the {layout.name} layout's text holds '{{{{', an Ollama action"
                return layout, ""
            common = os.path.commonprefix([texts[failed], rendered[failed]])  # noqa: RUF071 (texts)
            score = (failed, len(common))
            if nearest is None or score > nearest[0]:
                nearest = (score, layout, texts[failed])
    (failed, at), layout, text = nearest
    if failed == 0:
        return None, (
            "this model's chat template is none of ChatML, Phi-3/Phi-4 and Alpaca, the layouts "
            f"translated into Ollama's template syntax: for a user turn alone, from character {at}"
            f" it writes {rendered[0][at : at + 40]!r} where the nearest, {layout.name}, writes "
            f"{text[at : at + 40]!r}"
        )
    what = probes[failed][0]
    cause = _CAUSES["reasons" if "reasons" in what else what]
    return None, (
        f"the chat template renders {what} unlike the {layout.name} layout it otherwise follows "
        f"({cause}): from character {at} it writes {rendered[failed][at : at + 40]!r} where the "
        f"layout writes {text[at : at + 40]!r}"
    )


def match_layout(tokenizer, prompting: TemplateConfig | None = None) -> TurnLayout | None:
    """The layout whose rendering equals the tokenizer's chat template on every probe, if any."""
    return translate(tokenizer, prompting)[0]


def _quoted(text: str) -> str:
    # Modelfile values in triple quotes are taken verbatim; only a closing triple quote breaks.
    if '"""' in text:
        raise ValueError(f"cannot write {text!r} in a Modelfile (contains triple quotes)")
    return f'"""{text}"""'


def modelfile(
    model_dir: str | os.PathLike, gguf_name: str, others: list[str]
) -> tuple[str, str | None]:
    """(Modelfile text, name of the translated chat layout or None) for one exported GGUF.

    The probes render the chat template with the switches training rendered it with (the merged
    folder's record, `export/prompting.py`); with none that the layout renders the same way,
    the Modelfile writes no TEMPLATE and says why."""

    from sft_pipeline.export.prompting import read_prompting
    from sft_pipeline.model.loading import load_generation_config, load_tokenizer
    from sft_pipeline.model.stop_tokens import stop_token_ids

    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    generation_config = load_generation_config(model_dir)
    prompting = read_prompting(model_dir)
    lines = [
        "# Ollama Modelfile of the fine-tuned model: `ollama create NAME -f Modelfile`, then",
        "# `ollama run NAME`.",
    ]
    if others:
        lines.append(
            f"# Other GGUF files in this folder (change FROM to use one): {', '.join(others)}"
        )
    lines.append(f"FROM ./{gguf_name}")
    layout, reason = translate(tokenizer, prompting)
    if layout is None:
        log.warning("%s: the Modelfile gets no TEMPLATE: %s", model_dir, reason)
        # The reason on one line: it quotes the rendered texts where they part.
        lines += [
            f"# No TEMPLATE: {reason}.",
            "# llama.cpp applies the Jinja template stored in the GGUF; for Ollama, write a "
            "TEMPLATE by hand.",
        ]
        name = None
    else:
        switches = ""
        if prompting.enable_thinking is not None:
            thinking = str(prompting.enable_thinking).lower()
            switches = f", rendered with enable_thinking: {thinking} as in training"
        lines.append(
            f"# TEMPLATE: the {layout.name} layout, the same prompt as the chat template{switches}."
        )
        lines.append(f"TEMPLATE {_quoted(layout.go_template())}")
        if layout.default_system is not None:
            lines.append(f"SYSTEM {_quoted(layout.default_system)}")
        name = layout.name
    for token_id in stop_token_ids(tokenizer, generation_config):
        token = tokenizer.decode([token_id], skip_special_tokens=False)
        if '"' in token or "\n" in token or not token:
            log.warning("stop token %d (%r) cannot be written in a Modelfile", token_id, token)
            continue
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n", name
