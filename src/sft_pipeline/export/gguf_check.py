"""Does an exported GGUF file still behave like the merged model? Measured, per file.

    held-out chat prompts ──merged tokenizer──> ids ──merged model, greedy──> ids + continuation
                                                            │
    for each file:  llama.cpp tokenizes the prompt texts ───┤ must be the same ids
                    llama.cpp's argmax after each position ─┘ agreement = share of the
                                                              continuation's positions where it
                                                              picks the merged model's token

Teacher-forced: every position sees the merged model's own prefix, so one early flip does not
cascade into a different text (free-running agreement understates weight fidelity). Where
llama.cpp's client is not installed, the file is dequantized by the `gguf` package and loaded
into transformers instead (`by` says which); where neither can read it, the check says why and
the agreement is null.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sft_pipeline.export.gguf_vocab import ExportError

log = logging.getLogger(__name__)

# Not in any training set the pipeline ships: short, varied requests of the kinds users send.
HELD_OUT_PROMPTS = (
    "What is the capital of France?",
    "Convert the record to JSON: name Alice, age 31, city Paris.",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
)
NEW_TOKENS = 32


def prompt_texts(tokenizer) -> list[str]:
    """The held-out prompts as the merged model sees them (its chat template, if any)."""
    if getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in HELD_OUT_PROMPTS
        ]
    bos = tokenizer.bos_token or ""
    return [f"{bos}{p}\n" for p in HELD_OUT_PROMPTS]


def reference_runs(model, tokenizer, texts: list[str]) -> list[list[int]]:
    """Per text: its ids followed by exactly NEW_TOKENS greedy tokens of the merged model."""
    import torch

    runs = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        ids = ids.to(next(model.parameters()).device)
        with torch.inference_mode():
            out = model.generate(
                ids,
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                pad_token_id=tokenizer.pad_token_id,
            )
        runs.append(out[0].tolist())
    return runs


def agreement(runs: list[list[int]], predictions: list[list[int | None]]) -> float:
    """Share of continuation positions where the prediction is the reference's next token."""
    same = total = 0
    for run, predicted in zip(runs, predictions, strict=True):
        start = len(run) - NEW_TOKENS
        for position in range(start - 1, len(run) - 1):
            same += int(predicted[position] == run[position + 1])
            total += 1
    return same / total


def check_files(merged_dir: Path, files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """{gguf type: {agreement, positions, by, tokenization}} for each written file."""
    from transformers import AutoModelForCausalLM

    from sft_pipeline.export import llamacpp
    from sft_pipeline.model.loading import load_tokenizer

    tokenizer = load_tokenizer(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(merged_dir), **_reference_loading(merged_dir)
    ).eval()
    texts = prompt_texts(tokenizer)
    runs = reference_runs(model, tokenizer, texts)
    del model
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    missing = llamacpp.unavailable()
    results: dict[str, dict[str, Any]] = {}
    for gguf_type, path in files.items():
        if missing is None:
            probed = llamacpp.probe(path, texts, runs)
            if probed["tokens"] != prompt_ids:
                raise ExportError(
                    f"{path.name}: llama.cpp tokenizes the chat prompts differently from the "
                    f"merged tokenizer (first prompt: {probed['tokens'][0][:24]} vs "
                    f"{prompt_ids[0][:24]})"
                )
            predictions, by, tokenization = probed["next"], "llama.cpp", "identical"
        else:
            try:
                predictions = _transformers_predictions(path, runs)
            except Exception as exc:  # transformers reads only some architectures from GGUF
                log.warning("%s unchecked: no llama.cpp client (%s) and %s", path, missing, exc)
                results[gguf_type] = {"agreement": None, "by": f"unchecked: {exc}"}
                continue
            by, tokenization = "transformers (dequantized by gguf)", "not checked"
        score = agreement(runs, predictions)
        results[gguf_type] = {
            "agreement": round(score, 4),
            "positions": NEW_TOKENS * len(runs),
            "by": by,
            "tokenization": tokenization,
        }
        log.info("%s: teacher-forced agreement %.3f (%s)", path.name, score, by)
    return results


def _reference_loading(merged_dir: Path) -> dict[str, Any]:
    """How to load the merged model for the reference runs: on CUDA in its own dtype across the
    GPUs; on a CPU in fp32 when that takes at most half the available memory, else in its own
    dtype (a 7B model is 28 GB in fp32), said in the log."""
    import math

    import psutil
    import torch

    from sft_pipeline.export.shard_merge import read_header
    from sft_pipeline.model.device import on_cuda

    if on_cuda():
        return {"dtype": "auto", "device_map": "auto"}
    fp32 = 4 * sum(
        math.prod(entry.shape)
        for path in merged_dir.glob("*.safetensors")
        for entry in read_header(path).values()
    )
    available = psutil.virtual_memory().available
    if fp32 <= available // 2:
        return {"dtype": torch.float32}
    log.info(
        "export check: the merged model takes %.1f GiB in fp32, over half the %.1f GiB "
        "available; its reference runs use its own dtype",
        fp32 / 2**30,
        available / 2**30,
    )
    return {"dtype": "auto"}


def _transformers_predictions(path: Path, runs: list[list[int]]) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    predictions = []
    with torch.inference_mode():
        for run in runs:
            predictions.append(model(torch.tensor([run])).logits[0].argmax(-1).tolist())
    return predictions
