"""Talk to a model folder: one streamed chat, or a batch of prompts answered into JSON Lines.

Prompts are rendered exactly as in training: the tokenizer's chat template (the merged model's
tokenizer carries the template its data was rendered with) through the training's own renderer,
with the generation prompt and the switches the merged folder recorded (`export/prompting.py`:
the fixed date of `template.date`, `template.enable_thinking`, the trained system prompt), BOS
prepended where the model expects one and the template has not written it, then encoded as
training encoded a trained turn's prompt. Decoding is greedy and stops at EOS or the end-of-turn
token of the model's generation config. A reply's reasoning goes back into the conversation as
`reasoning_content`, as the training data held it, so the template treats it in later turns as
it did in training (Qwen3 drops it from the history, SmolLM3 never shows it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TextIO

from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.common.errors import UserError

DEFAULT_MODEL_DIR = Path("data/06_models/merged")


class PromptFileError(UserError, ValueError):
    """A prompts file line is neither a prompt string nor a conversation."""


@dataclass
class ChatModel:
    model: Any
    tokenizer: Any
    stop_ids: list[int]
    # How training rendered prompts: the template's date and switches the merged folder recorded
    # (`export/prompting.py`), rendering with the tokenizer's own template.
    prompting: TemplateConfig = field(
        default_factory=lambda: TemplateConfig(chat_template="tokenizer")
    )

    @cached_property
    def renderer(self):
        from sft_pipeline.data.templating import Renderer, tokenizer_template

        if not tokenizer_template(self.tokenizer):
            raise ValueError(
                f"{self.tokenizer.name_or_path}: the tokenizer has no chat template to render "
                "a conversation with"
            )
        return Renderer(self.tokenizer, self.prompting)

    def prompt_text(self, messages: list[dict[str, Any]]) -> str:
        from sft_pipeline.export.prompting import render_prompt

        text = render_prompt(self.renderer, messages)
        bos = self.renderer.bos_text
        return text if text.startswith(bos) else bos + text

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The ids the model is fed for `messages`: the prompt encoded as training encoded a
        trained turn's prompt (on its own, BOS split off), as `generate` encodes it too."""
        from sft_pipeline.data.encoding import encode_texts

        return encode_texts(self.tokenizer, [self.prompt_text(messages)])[0][0]

    def reply(self, messages: list[dict[str, str]], max_new_tokens: int, out: TextIO | None = None):
        """The greedy reply to `messages`; with `out`, its text is written there as it comes."""
        import torch
        from transformers import TextStreamer

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

        ids = torch.tensor([self.prompt_ids(messages)], device=self.model.device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
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
        new = output[0, ids.shape[1] :].tolist()
        end = next((k for k, t in enumerate(new) if t in self.stop_ids), len(new))
        return self.tokenizer.decode(new[:end], skip_special_tokens=True).strip()


def load_chat_model(model_dir: str | os.PathLike = DEFAULT_MODEL_DIR) -> ChatModel:

    from sft_pipeline.export.prompting import read_prompting
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
    return ChatModel(model, tokenizer, stop_ids, read_prompting(model_dir))


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
                self.messages.append(assistant_message(reply))
                answers += 1
            out.write(prompt)
            out.flush()
        return answers


def assistant_message(reply: str) -> dict[str, str]:
    """A reply as the conversation keeps it: reasoning the model wrote inline at its start
    (between the template's reasoning tags) kept apart as `reasoning_content`, as the training
    data held it (module doc)."""
    from sft_pipeline.data.turns import INLINE_TAGS, split_inline_reasoning

    return split_inline_reasoning([{"role": "assistant", "content": reply}], INLINE_TAGS)[0]


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
