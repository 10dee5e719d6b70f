"""Render, tokenize and fingerprint a small data set, printing the results as JSON; run by
tests/data/test_template_date.py under `faketime` to show nothing depends on the system date.

    python -m tests.data.render_on_a_date TEMPLATE_FILE
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "user", "content": "Convert: name Alice, age 31"},
        {"role": "assistant", "content": '{"name": "Alice", "age": 31}'},
    ],
]


def main(template_file: str) -> None:
    from sft_pipeline.common.config import (
        LoraConfig,
        QuantizationConfig,
        TemplateConfig,
        TokenizationConfig,
        TrainingConfig,
    )
    from sft_pipeline.data.templating import Renderer
    from sft_pipeline.data.tokenization import tokenize_texts
    from sft_pipeline.finetune.job import TrainJob
    from sft_pipeline.finetune.run_state import run_fingerprint
    from tests.conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    renderer = Renderer(tokenizer, TemplateConfig(chat_template=template_file))
    rows = [
        {"record_id": str(i), **renderer.row(messages)} for i, messages in enumerate(CONVERSATIONS)
    ]
    tokens, _ = tokenize_texts(rows, tokenizer, TokenizationConfig(max_seq_length=512))
    job = TrainJob(
        base_model_dir=Path("base"),
        train_tokens=tokens,
        eval_tokens=None,
        quantization=QuantizationConfig(),
        lora=LoraConfig(),
        training=TrainingConfig(),
        max_length=512,
    )
    manifest = {"name": "tiny", "content_hash": "0" * 64}
    print(
        json.dumps(
            {
                "today": datetime.date.today().isoformat(),
                "texts": ["".join(s["text"] for s in row["segments"]) for row in rows],
                "input_ids": [list(r) for r in tokens.to_dict()["input_ids"]],
                "fingerprint": run_fingerprint(job, manifest)["fingerprint"],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
