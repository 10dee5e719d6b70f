"""Evaluate the base and the merged model side by side on the held-out split.

Two kinds of metrics: teacher-forced loss, perplexity and token accuracy on the supervised tokens
of `eval_tokens` (the exact labels training used), and free generation on the prompts of
`eval_texts` (greedy, batched with left padding) scored against the reference answers. When the
data has tools, the held-out rows whose assistant calls a tool are also generated from the prompt
before that call, and scored by `TOOL_CALL_METRICS` (the call parses, names the right function,
has the reference arguments).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from sft_pipeline.common.config import EvaluationConfig, QuantizationConfig
from sft_pipeline.evaluation.benchmarks import BenchmarkSuite
from sft_pipeline.evaluation.generation import (
    batches,
    generate,
    generate_with_images,
    image_fields,
    prompt_for,
)
from sft_pipeline.evaluation.metrics import (
    GENERATION_METRICS,
    LOSS_METRICS,
    TOOL_CALL_METRICS,
    generation_scores,
    tool_call_scores,
)
from sft_pipeline.evaluation.plots import plot_comparison, plot_token_lengths, plot_training_history
from sft_pipeline.model.loading import load_model, load_tokenizer_or_processor

log = logging.getLogger(__name__)


def evaluate(
    base_model_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    eval_texts: list[dict[str, Any]],
    eval_tokens,
    training_history: list[dict[str, Any]],
    token_stats: dict[str, Any],
    cfg: EvaluationConfig,
    base_quantization: QuantizationConfig | None = None,
    benchmarks: BenchmarkSuite | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """-> (flat metrics, generations side by side, {name: matplotlib Figure}).

    One model is in memory at a time. `base_quantization` (the 4-bit settings when training was
    QLoRA) loads the base in 4-bit on CUDA, as training held it, so evaluation needs no more
    memory than training did. `benchmarks` (checked tasks) scores each model while it is loaded,
    through lm-evaluation-harness (`benchmarks/...` metrics).
    """
    import torch

    samples = [row for row in eval_texts if row.get("prompt") and row.get("reference")]
    samples = samples[: cfg.max_samples]
    calls = [
        {
            **row["tool_call"],
            "record_id": row.get("record_id"),
            "encoded": prompt_for(row, row["tool_call"]["prompt"]),
        }
        for row in eval_texts
        if row.get("tool_call")
    ][: cfg.max_samples]
    log.info(
        "evaluating on %d tokenized rows and %d of %d prompts (rows without a reference are"
        " language-modelling text and are scored by loss only)",
        len(eval_tokens),
        len(samples),
        len(eval_texts),
    )
    merged_tokenizer, merged_processor = load_tokenizer_or_processor(merged_dir)
    stop_ids = _stop_ids(Path(merged_dir), merged_tokenizer)
    metrics: dict[str, Any] = {
        "num_eval_rows": len(eval_tokens),
        "num_generation_samples": len(samples),
    }
    if calls:
        metrics["num_tool_call_samples"] = len(calls)
    outputs: dict[str, list[dict[str, Any]]] = {}
    for name, model_dir in (("base", Path(base_model_dir)), ("tuned", Path(merged_dir))):
        torch.manual_seed(0)
        tokenizer, processor = (
            (merged_tokenizer, merged_processor)
            if name == "tuned"
            else load_tokenizer_or_processor(model_dir)
        )
        quantization = base_quantization if name == "base" and _on_cuda() else None
        model = load_model(model_dir, quantization=quantization).eval()
        loss = supervised_loss(model, eval_tokens, cfg.batch_size)
        if processor is not None:
            generated = generate_with_images(model, processor, samples, stop_ids, cfg)
        else:
            prompts = [prompt_for(s, s["prompt"]) for s in samples]
            generated = generate(model, tokenizer, prompts, stop_ids, cfg, desc=name)
        scores = generation_scores(generated, [s["reference"] for s in samples])
        called = generate(model, tokenizer, [c["encoded"] for c in calls], stop_ids, cfg)
        scores |= tool_call_scores(called, [c["reference"] for c in calls])
        metrics.update({f"{name}/{k}": v for k, v in {**loss, **scores}.items()})
        outputs[name], outputs[f"{name}_calls"] = generated, called
        if benchmarks is not None:  # last: lm-eval may give the tokenizer a pad token
            benchmarks.score(name, model, tokenizer)
        del model
    metrics["num_supervised_tokens"] = metrics.pop("base/num_tokens", 0)
    metrics.pop("tuned/num_tokens", None)
    if benchmarks is not None:
        metrics.update(benchmarks.metrics())
    for key in (*LOSS_METRICS, *GENERATION_METRICS, *TOOL_CALL_METRICS):
        if f"base/{key}" in metrics:
            metrics[f"delta/{key}"] = metrics[f"tuned/{key}"] - metrics[f"base/{key}"]
    generations = [
        {
            "record_id": sample.get("record_id"),
            "prompt": sample["prompt"],
            "reference": sample["reference"],
            "base_output": base["text"],
            "tuned_output": tuned["text"],
            "base_stopped": base["stopped"],
            "tuned_stopped": tuned["stopped"],
            **image_fields(sample),
        }
        for sample, base, tuned in zip(samples, outputs["base"], outputs["tuned"], strict=True)
    ]
    generations += [
        {
            "record_id": call["record_id"],
            "task": "tool_call",
            "prompt": call["prompt"],
            "reference": json.dumps(call["reference"], ensure_ascii=False),
            "base_output": base["text"],
            "tuned_output": tuned["text"],
            "base_stopped": base["stopped"],
            "tuned_stopped": tuned["stopped"],
        }
        for call, base, tuned in zip(
            calls, outputs["base_calls"], outputs["tuned_calls"], strict=True
        )
    ]
    plots = {
        "training_loss": plot_training_history(training_history),
        "token_lengths": plot_token_lengths(token_stats),
        "base_vs_tuned": plot_comparison(metrics),
    }
    return dict(sorted(metrics.items())), generations, plots


def _stop_ids(model_dir: Path, tokenizer) -> list[int]:
    """The merged model's stop tokens (EOS plus end-of-turn), used for both models alike."""
    from transformers import GenerationConfig

    from sft_pipeline.model.stop_tokens import stop_token_ids

    return stop_token_ids(tokenizer, GenerationConfig.from_pretrained(model_dir))


def _on_cuda() -> bool:
    from sft_pipeline.model.device import on_cuda

    return on_cuda()


# --- loss on supervised tokens ------------------------------------------------------------------


def supervised_loss(model, eval_tokens, batch_size: int) -> dict[str, float]:
    """Mean NLL, perplexity and argmax accuracy over every supervised token (token-weighted).

    Batches are padded by the trainer's collator and scored by the trainer's loss
    (`trainer.loss.causal_lm_loss`): the LM head runs only on supervised positions, in chunks.
    """
    import torch

    from sft_pipeline.trainer.collator import DataCollatorForSFT
    from sft_pipeline.trainer.loss import causal_lm_loss

    if len(eval_tokens) == 0:
        return {}
    device = next(model.parameters()).device
    collate = DataCollatorForSFT(pad_token_id=0)
    lengths = [len(ids) for ids in eval_tokens["input_ids"]]
    # Longest first: similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    total_nll, total_correct, total_tokens = 0.0, 0, 0
    with torch.inference_mode():
        for batch in batches(order, batch_size):
            rows = eval_tokens.select(batch)
            # Text rows: ids and labels; rows with images also their stored processor arrays.
            features = [{k: v for k, v in r.items() if k != "record_id"} for r in rows]
            padded = {k: v.to(device) for k, v in collate(features).items()}
            inputs = {k: v for k, v in padded.items() if k not in ("labels", "shift_labels")}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
            nll, correct, count = causal_lm_loss(model, inputs, padded["shift_labels"])
            total_nll += nll.item()
            total_correct += int(correct)
            total_tokens += int(count)
    if total_tokens == 0:
        return {"num_tokens": 0}
    loss = total_nll / total_tokens
    return {
        "eval_loss": loss,
        "perplexity": math.exp(loss),
        "mean_token_accuracy": total_correct / total_tokens,
        "num_tokens": total_tokens,
    }
