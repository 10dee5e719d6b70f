"""`kedro sft chat` and `kedro sft generate`: talk to the merged model (or any model folder).

Registered in the project's command group (sft_pipeline.cli), so they run inside the project
like `kedro run`; a relative default model folder is taken from the project root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sft_pipeline.export.chat import DEFAULT_MODEL_DIR

_MODEL_HELP = (
    f"Model folder (safetensors + tokenizer). Default: {DEFAULT_MODEL_DIR} of the project."
)


def _model_dir(metadata, model: str | None) -> Path:
    if model:
        return Path(model)
    root = Path(metadata.project_path) if metadata is not None else Path.cwd()
    return root / DEFAULT_MODEL_DIR


def _load(metadata, model: str | None):
    from sft_pipeline.export.chat import load_chat_model

    try:
        return load_chat_model(_model_dir(metadata, model))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(name="sft")
def sft() -> None:
    """Talk to the fine-tuned model."""


@sft.command()
@click.option("--model", "-m", default=None, help=_MODEL_HELP)
@click.option(
    "--system",
    default=None,
    help="System message at the start of the conversation (default: the one training used).",
)
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.pass_obj
def chat(metadata, model: str | None, system: str | None, max_new_tokens: int) -> None:
    """Chat on standard input: each line is your turn, the reply streams back; `/reset` starts
    over; end of input (Ctrl-D) quits."""
    from sft_pipeline.export.chat import ChatSession

    session = ChatSession(_load(metadata, model), system=system, max_new_tokens=max_new_tokens)
    prompt = ">>> " if sys.stdin.isatty() else ""
    session.run(sys.stdin, sys.stdout, prompt=prompt)
    if prompt:
        click.echo()


@sft.command()
@click.option(
    "--prompts",
    "-p",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help='JSON Lines of strings, {"prompt": ...} or {"messages": [...]}; or .txt, one a line.',
)
@click.option("--output", "-o", default="-", help="JSON Lines out, one answer per prompt.")
@click.option("--model", "-m", default=None, help=_MODEL_HELP)
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.pass_obj
def generate(
    metadata, prompts: str, output: str, model: str | None, max_new_tokens: int, batch_size: int
) -> None:
    """Answer every prompt of a file (greedy), one JSON line per prompt, in order."""
    from sft_pipeline.common.atomic import write_text
    from sft_pipeline.export.chat import PromptFileError, answer_prompts, read_prompts

    try:
        conversations = read_prompts(prompts)
    except PromptFileError as exc:
        raise click.ClickException(str(exc)) from exc
    rows = answer_prompts(_load(metadata, model), conversations, max_new_tokens, batch_size)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output == "-":
        click.echo(text, nl=False)
    else:
        write_text(output, text)
        click.echo(f"wrote {len(rows)} answers to {output}", err=True)
