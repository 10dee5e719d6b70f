"""The Ollama `Modelfile` of an exported model: FROM the GGUF, TEMPLATE, SYSTEM, stop tokens.

Ollama renders prompts with its own Go-template syntax, not Jinja, so the chat template is
translated for the layouts it can be checked against: a turn is a fixed prefix, the message and
a fixed suffix per role, then a generation prompt. The layout is recognised by rendering probe
conversations with the tokenizer's Jinja template and comparing them, character for character,
with the layout's own rendering; one that renders differently in any probe gets no TEMPLATE and
the Modelfile says so (llama.cpp itself still applies the Jinja template from the GGUF).

    ChatML:  <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n
    Phi-3:   <|{role}|>\\n{content}<|end|>\\n ... <|assistant|>\\n   (Phi-4: without the newlines)
    Alpaca:  {system}\\n\\n ### Instruction:\\n{user}\\n\\n ### Response:\\n{reply}{eos}\\n\\n ...
             ### Response:\\n
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

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


_PROBE_TEXTS = ("What is 2 + 2?", "4.", "And times 3?", "Be brief.")


def probe_conversations() -> list[list[dict[str, str]]]:
    """Conversations ending with a user turn: with and without system, one and two turns."""
    q1, a1, q2, system = _PROBE_TEXTS
    user = [{"role": "user", "content": q1}]
    two_turns = [*user, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    sys_msg = [{"role": "system", "content": system}]
    return [user, [*sys_msg, *user], two_turns, [*sys_msg, *two_turns]]


def _render_jinja(tokenizer, messages) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # a template may reject a probe (e.g. no system role): untranslatable
        log.info("chat template rejected a probe conversation: %s", exc)
        return None


def _with_default_system(layout: TurnLayout, rendered_user_only: str) -> TurnLayout:
    """The layout, plus the system prompt the template inserts when a conversation has none."""
    prefix, suffix = layout.prefix["system"], layout.suffix["system"]
    if prefix and rendered_user_only.startswith(prefix):
        end = rendered_user_only.find(suffix, len(prefix))
        if end > 0:
            system = rendered_user_only[len(prefix) : end]
            return TurnLayout(
                layout.name, layout.prefix, layout.suffix, layout.generation_prompt, system
            )
    return layout


def match_layout(tokenizer) -> TurnLayout | None:
    """The layout whose rendering equals the tokenizer's chat template on every probe, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probes = probe_conversations()
    rendered = [_render_jinja(tokenizer, p) for p in probes]
    if any(r is None for r in rendered):
        return None
    candidates = [chatml_layout(), role_tag_layout(newline=True), role_tag_layout(newline=False)]
    if tokenizer.eos_token:
        candidates.append(alpaca_layout(tokenizer.eos_token))
    for candidate in candidates:
        for layout in (candidate, _with_default_system(candidate, rendered[0])):
            if all(layout.render(p) == r for p, r in zip(probes, rendered, strict=True)):
                return layout
    return None


def _quoted(text: str) -> str:
    # Modelfile values in triple quotes are taken verbatim; only a closing triple quote breaks.
    if '"""' in text:
        raise ValueError(f"cannot write {text!r} in a Modelfile (contains triple quotes)")
    return f'"""{text}"""'


def modelfile(
    model_dir: str | os.PathLike, gguf_name: str, others: list[str]
) -> tuple[str, str | None]:
    """(Modelfile text, name of the translated chat layout or None) for one exported GGUF."""

    from sft_pipeline.model.loading import load_generation_config, load_tokenizer
    from sft_pipeline.model.stop_tokens import stop_token_ids

    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    generation_config = load_generation_config(model_dir)
    lines = [
        "# Ollama Modelfile of the fine-tuned model: `ollama create NAME -f Modelfile`, then",
        "# `ollama run NAME`.",
    ]
    if others:
        lines.append(
            f"# Other GGUF files in this folder (change FROM to use one): {', '.join(others)}"
        )
    lines.append(f"FROM ./{gguf_name}")
    layout = match_layout(tokenizer)
    if layout is None or "{{" in "".join([*layout.prefix.values(), *layout.suffix.values()]):
        lines += [
            "# No TEMPLATE: this model's chat template is none of ChatML, Phi-3/Phi-4 and Alpaca,",
            "# the layouts translated into Ollama's template syntax. llama.cpp applies the Jinja",
            "# template stored in the GGUF; for Ollama, write a TEMPLATE by hand.",
        ]
        name = None
    else:
        lines.append(f"# TEMPLATE: the {layout.name} layout, the same prompt as the chat template.")
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
