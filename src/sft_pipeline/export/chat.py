"""Talk to a model folder: one streamed chat, or a batch of prompts answered into JSON Lines.

Prompts are rendered exactly as in training: the tokenizer's chat template (the merged model's
tokenizer carries the template its data was rendered with) with the generation prompt and the
training's fixed date (`template.date`, for templates that print one), BOS
prepended where the model expects one and the template has not written it, then tokenized
without special tokens. Decoding is greedy and stops at EOS or the end-of-turn token of the
model's generation config.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sft_pipeline.common.config import DEFAULT_TEMPLATE_DATE
from sft_pipeline.common.errors import UserError

DEFAULT_MODEL_DIR = Path("data/06_models/merged")


class PromptFileError(UserError, ValueError):
    """A prompts file line is neither a prompt string nor a conversation."""


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    stop_ids: list[int]
    # The day date-printing templates see (`template.date` of the training run).
    date: datetime.date = DEFAULT_TEMPLATE_DATE

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        from sft_pipeline.data.templating import render_chat, tokenizer_adds_bos, tokenizer_template

        template = tokenizer_template(self.tokenizer)
        if not template:
            raise ValueError(
                f"{self.tokenizer.name_or_path}: the tokenizer has no chat template to render "
                "a conversation with"
            )
        text = render_chat(
            self.tokenizer, messages, template, add_generation_prompt=True, day=self.date
        )
        bos = self.tokenizer.bos_token
        if tokenizer_adds_bos(self.tokenizer) and not text.startswith(bos):
            text = bos + text
        return text

    def reply(self, messages: list[dict[str, str]], max_new_tokens: int, out: TextIO | None = None):
        """The greedy reply to `messages`; with `out`, its text is written there as it comes."""
        import torch
        from transformers import TextStreamer

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

        enc = self.tokenizer(
            self.prompt_text(messages), add_special_tokens=False, return_tensors="pt"
        ).to(self.model.device)
        streamer = (
            _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if out else None
        )
        with torch.inference_mode():
            output = self.model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
            )
        new = output[0, enc["input_ids"].shape[1] :].tolist()
        end = next((k for k, t in enumerate(new) if t in self.stop_ids), len(new))
        return self.tokenizer.decode(new[:end], skip_special_tokens=True).strip()


def load_chat_model(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR) -> ChatModel:

    from sft_pipeline.export.merge import prompting_date
    from sft_pipeline.model.loading import load_generation_config, load_model, load_tokenizer
    from sft_pipeline.model.stop_tokens import stop_token_ids

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no model folder (config.json); run the pipeline to merge one, or "
            "pass --model DIR"
        )
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    generation_config = load_generation_config(model_dir)
    stop_ids = stop_token_ids(tokenizer, generation_config)
    return ChatModel(model, tokenizer, stop_ids, prompting_date(model_dir) or DEFAULT_TEMPLATE_DATE)


@dataclass
class ChatSession:
    """A conversation kept across turns; `/reset` on its own line starts a new one."""

    chat: ChatModel
    system: str | None = None
    max_new_tokens: int = 256
    messages: list[dict[str, str]] = field(default_factory=list)

    def run(self, lines: Iterable[str], out: TextIO, prompt: str = "") -> int:
        """Answer each non-empty line, streamed to `out`; returns the number of answers."""
        answers = 0
        out.write(prompt)
        out.flush()
        for line in lines:
            text = line.strip()
            if text == "/reset":
                self.messages = []
            elif text:
                if not self.messages and self.system:
                    self.messages.append({"role": "system", "content": self.system})
                self.messages.append({"role": "user", "content": text})
                reply = self.chat.reply(self.messages, self.max_new_tokens, out=out)
                self.messages.append({"role": "assistant", "content": reply})
                answers += 1
            out.write(prompt)
            out.flush()
        return answers


def read_prompts(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Conversations from a prompts file: JSON Lines or plain text, one prompt a line.

    A JSON line is a string, `{"prompt": ...}` (optional `"system"`) or `{"messages": [...]}`;
    any other line of a `.txt` file is the prompt itself.
    """
    path = Path(path)
    conversations = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix == ".txt":
                conversations.append([{"role": "user", "content": line.rstrip("\n")}])
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            conversations.append(_conversation(row, f"{path}:{number}"))
    return conversations


def _conversation(row: Any, where: str) -> list[dict[str, str]]:
    if isinstance(row, str):
        return [{"role": "user", "content": row}]
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row["messages"]
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return [*system, {"role": "user", "content": row["prompt"]}]
    raise PromptFileError(f'{where}: expected a string, {{"prompt": ...}} or {{"messages": [...]}}')


def answer_prompts(
    chat: ChatModel, conversations: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int
) -> list[dict[str, Any]]:
    """One row per conversation: the prompt as given, the answer, whether it stopped by itself."""
    from sft_pipeline.common.config import EvaluationConfig
    from sft_pipeline.evaluation.generation import generate

    prompts = [chat.prompt_text(c) for c in conversations]
    cfg = EvaluationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    generated = generate(chat.model, chat.tokenizer, prompts, chat.stop_ids, cfg)
    return [
        {
            "messages": c,
            "response": g["text"],
            "stopped": g["stopped"],
            "num_tokens": g["num_tokens"],
        }
        for c, g in zip(conversations, generated, strict=True)
    ]
