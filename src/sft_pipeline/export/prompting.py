"""How training prompted the model, recorded beside the merged weights and read back by every
runtime that prompts it (`kedro sft chat|generate`, the Ollama Modelfile's probes).

The merged tokenizer carries the template the data was rendered with; `sft_prompting.json` holds
what the template was rendered with besides the conversation:

    {"template_date": "2024-07-26",   template.date: the day date-printing templates see
     "enable_thinking": false,        template.enable_thinking, only when the run set it
     "system_prompt": "Be brief."}    template.system_prompt, only when the run set it

A key is written only when the run set it, so a run that sets neither switch writes the file it
wrote before they were recorded. Read back, the record is the `TemplateConfig` that renders with
the tokenizer's own template, and a prompt is rendered through the training's own `Renderer`:
the switches reach the template exactly as they did when the data was rendered.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.common.errors import UserError

PROMPTING_FILE = "sft_prompting.json"
# The record's keys: `template.date` has kept the name it was first recorded under.
_KEYS = ("template_date", "enable_thinking", "system_prompt")


class PromptingFileError(UserError, ValueError):
    """A merged folder's prompting record cannot be read."""


def prompting_record(cfg: TemplateConfig) -> dict[str, Any]:
    """What `PROMPTING_FILE` holds for a run's `template` parameters (module doc)."""
    record: dict[str, Any] = {"template_date": cfg.date.isoformat()}
    if cfg.enable_thinking is not None:
        record["enable_thinking"] = cfg.enable_thinking
    if cfg.system_prompt:
        record["system_prompt"] = cfg.system_prompt
    return record


def write_prompting(folder: Path, cfg: TemplateConfig) -> None:
    (folder / PROMPTING_FILE).write_text(json.dumps(prompting_record(cfg), indent=2) + "\n")


def read_prompting(model_dir: Path) -> TemplateConfig:
    """The template parameters a merged folder was trained with, rendering with its tokenizer's
    own template; a folder without a record (any model folder) gets the defaults."""
    path = Path(model_dir) / PROMPTING_FILE
    if not path.is_file():
        return TemplateConfig(chat_template="tokenizer")
    expected = (
        'expected {"template_date": "YYYY-MM-DD"} with optional "enable_thinking" (true or '
        'false) and "system_prompt" (text)'
    )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptingFileError(f"{path}: not JSON ({exc}); {expected}") from None
    if not isinstance(record, dict) or "template_date" not in record:
        raise PromptingFileError(f"{path}: {expected}")
    if unknown := sorted(set(record) - set(_KEYS)):
        # A switch this version does not know would be dropped: the model prompted unlike training.
        raise PromptingFileError(f"{path}: unknown key {unknown[0]!r}; {expected}")
    try:
        day = datetime.date.fromisoformat(str(record["template_date"]))
    except ValueError:
        raise PromptingFileError(
            f"{path}: template_date {record['template_date']!r} is not a YYYY-MM-DD date"
        ) from None
    for key, kind, what in (
        ("enable_thinking", bool, "true or false"),
        ("system_prompt", str, "text"),
    ):
        if key in record and not isinstance(record[key], kind):
            raise PromptingFileError(f"{path}: {key} is {record[key]!r}, expected {what}")
    return TemplateConfig(
        chat_template="tokenizer",
        date=day,
        enable_thinking=record.get("enable_thinking"),
        system_prompt=record.get("system_prompt"),
    )


def render_prompt(renderer, messages: list[dict[str, Any]]) -> str:
    """The prompt for `messages` as training rendered a trained turn's prompt with `renderer`
    (a `Renderer` of the trained template): the trained system prompt when the conversation
    has none of its own, the template's switches and date, the generation prompt; no BOS added
    (runtimes add it their own way)."""
    from sft_pipeline.data.chat_templates import with_system_prompt

    messages = with_system_prompt(messages, renderer.cfg.system_prompt) if messages else messages
    return renderer.render(messages, add_generation_prompt=True)
