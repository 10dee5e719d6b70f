"""The held-out prompts an exported GGUF file is checked on, rendered as training renders them.

Shared by the export check (`gguf_check`, which measures agreement on them) and the tokenizer
metadata (`gguf_vocab`, which decides llama.cpp's space prefix from the first one).
"""

from __future__ import annotations

# Not in any training set the pipeline ships: short, varied requests of the kinds users send.
HELD_OUT_PROMPTS = (
    "What is the capital of France?",
    "Convert the record to JSON: name Alice, age 31, city Paris.",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
)


def prompt_texts(tokenizer) -> list[str]:
    """The held-out prompts as training renders them: the merged model's chat template (or the
    prompt and a newline without one), BOS first where training put one."""
    from sft_pipeline.data.templating import tokenizer_adds_bos

    bos = tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in HELD_OUT_PROMPTS
        ]
    else:
        texts = [f"{p}\n" for p in HELD_OUT_PROMPTS]
    # As the renderer does: the template may write BOS itself, never twice.
    return [t if t.startswith(bos) else bos + t for t in texts]
