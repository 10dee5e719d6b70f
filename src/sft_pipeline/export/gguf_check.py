"""Does an exported GGUF file still behave like the merged model? Measured, per file.

    held-out chat prompts ──training's tokenization──> ids ──merged model, greedy, free──>
                                                          ids + continuation (up to its stop)
                                                            │
    for each file:  llama.cpp tokenizes the prompt texts ───┤ must be the ids training used
                    llama.cpp's argmax after each position ─┘ agreement = share of the
                                                              continuation's positions where it
                                                              picks the merged model's token

The prompt ids are those training gave the same text (`tokenization.encode_texts`: BOS split off
and the rest tokenized on its own), not a plain `tokenizer(text)` of the whole text, which reads
SentencePiece's start-of-input "▁" differently. The continuation is generated freely, ending
where the merged model stops (its stop token counts as a position: the file must stop there
too), at most NEW_TOKENS. Teacher-forced: every position sees the merged model's own prefix, so
one early flip does not cascade into a different text (free-running agreement understates
weight fidelity). Where
llama.cpp's client is not installed, the file is dequantized by the `gguf` package and loaded
into transformers instead (`by` says which); where neither can read it, the check says why and
the agreement is null.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sft_pipeline.export.check_prompts import prompt_texts
from sft_pipeline.export.errors import ExportError

log = logging.getLogger(__name__)

NEW_TOKENS = 32


def reference_runs(model, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Per prompt: its ids followed by the merged model's greedy continuation, which ends at its
    stop token (included) or after NEW_TOKENS."""
    import torch

    runs = []
    device = next(model.parameters()).device
    for ids in prompt_ids:
        prompt = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = model.generate(
                prompt,
                # Every prompt token is attended: a mask derived from the pad id would hide a
                # pad token the prompt itself holds.
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
            )
        runs.append(out[0].tolist())
    return runs


def agreement(runs: list[list[int]], prompt_ids: list[list[int]], predictions) -> float:
    """Share of continuation positions where the prediction is the reference's next token."""
    same = total = 0
    for run, prompt, predicted in zip(runs, prompt_ids, predictions, strict=True):
        for position in range(len(prompt) - 1, len(run) - 1):
            same += int(predicted[position] == run[position + 1])
            total += 1
    if total == 0:
        raise ExportError("export check: the merged model generated nothing after any prompt")
    return same / total


def check_files(merged_dir: Path, files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """{gguf type: {agreement, positions, by, tokenization}} for each written file."""
    from transformers import AutoModelForCausalLM

    from sft_pipeline.data.tokenization import encode_texts
    from sft_pipeline.export import llamacpp
    from sft_pipeline.model.loading import load_tokenizer

    tokenizer = load_tokenizer(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(merged_dir), **_reference_loading(merged_dir)
    ).eval()
    texts = prompt_texts(tokenizer)
    prompt_ids = encode_texts(tokenizer, texts)[0]
    runs = reference_runs(model, prompt_ids)
    del model
    missing = llamacpp.unavailable()
    results: dict[str, dict[str, Any]] = {}
    for gguf_type, path in files.items():
        if missing is None:
            probed = llamacpp.probe(path, texts, runs)
            if probed["tokens"] != prompt_ids:
                k = next(i for i, ids in enumerate(prompt_ids) if ids != probed["tokens"][i])
                raise ExportError(
                    f"{path.name}: llama.cpp tokenizes the chat prompt {texts[k][:60]!r} "
                    f"differently from training ({probed['tokens'][k][:24]} vs "
                    f"{prompt_ids[k][:24]})"
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
        score = agreement(runs, prompt_ids, predictions)
        results[gguf_type] = {
            "agreement": round(score, 4),
            "positions": sum(len(r) - len(p) for r, p in zip(runs, prompt_ids, strict=True)),
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

    from sft_pipeline.common.safetensors_files import read_header
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
