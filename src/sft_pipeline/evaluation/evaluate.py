"""Evaluate the base and the merged model side by side on the held-out split.

Two kinds of metrics: teacher-forced loss, perplexity and token accuracy on the supervised tokens
of `eval_tokens` (the exact labels training used), and free generation on the prompts of
`eval_texts` (greedy, batched with left padding) scored against the reference answers. When the
data has tools, the held-out rows whose assistant calls a tool are also generated from the prompt
before that call, and scored by `TOOL_CALL_METRICS` (the call parses, names the right function,
has the reference arguments). Rows whose trained turn reasons are also scored on the answer alone;
a mixture's rows also per source (`sft_pipeline.evaluation.scoring`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
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
from sft_pipeline.evaluation.metrics import loss_metrics
from sft_pipeline.evaluation.plots import plot_comparison, plot_token_lengths, plot_training_history
from sft_pipeline.evaluation.scoring import LossTotals, Scored, SideOutputs, split_metrics
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
    reasoning_tags: tuple[str, str] = ("<think>", "</think>"),
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """-> (metrics, generations side by side, {name: matplotlib Figure}).

    One model is in memory at a time. `base_quantization` (the 4-bit settings when training was
    QLoRA) loads the base in 4-bit on CUDA, as training held it, so evaluation needs no more
    memory than training did. `benchmarks` (checked tasks) scores each model while it is loaded,
    through lm-evaluation-harness (`benchmarks/...` metrics). `reasoning_tags`: the tags
    around a generation's reasoning block (`data.reasoning_tags`).
    """
    import torch

    samples, calls, source_of, total = [], [], {}, 0
    for row in eval_texts:
        total += 1
        if row.get("source"):
            source_of[row["record_id"]] = row["source"]
        if row.get("prompt") and row.get("reference") and len(samples) < cfg.max_samples:
            samples.append(row)
        if row.get("tool_call") and len(calls) < cfg.max_samples:
            calls.append(
                {
                    **row["tool_call"],
                    "record_id": row.get("record_id"),
                    "source": row.get("source", ""),
                    "encoded": prompt_for(row, row["tool_call"]["prompt"]),
                }
            )
    row_sources = [source_of.get(rid, "") for rid in eval_tokens["record_id"]]
    log.info(
        "evaluating on %d tokenized rows and %d of %d prompts (rows without a reference are"
        " language-modelling text and are scored by loss only)",
        len(eval_tokens),
        len(samples),
        total,
    )
    merged_tokenizer, merged_processor = load_tokenizer_or_processor(merged_dir)
    stop_ids = _stop_ids(Path(merged_dir), merged_tokenizer)
    outputs: dict[str, SideOutputs] = {}
    for name, model_dir in (("base", Path(base_model_dir)), ("tuned", Path(merged_dir))):
        torch.manual_seed(0)
        tokenizer, processor = (
            (merged_tokenizer, merged_processor)
            if name == "tuned"
            else load_tokenizer_or_processor(model_dir)
        )
        quantization = base_quantization if name == "base" and _on_cuda() else None
        model = load_model(model_dir, quantization=quantization).eval()
        losses = supervised_totals(model, eval_tokens, cfg.batch_size, row_sources)
        if processor is not None:
            generated = generate_with_images(model, processor, samples, stop_ids, cfg)
        else:
            prompts = [prompt_for(s, s["prompt"]) for s in samples]
            generated = generate(model, tokenizer, prompts, stop_ids, cfg, desc=name)
        called = generate(model, tokenizer, [c["encoded"] for c in calls], stop_ids, cfg)
        outputs[name] = SideOutputs(losses, generated, called)
        if benchmarks is not None:  # last: lm-eval may give the tokenizer a pad token
            benchmarks.score(name, model, tokenizer)
        del model
    scored = Scored(row_sources, samples, calls, tuple(reasoning_tags))
    metrics = split_metrics(scored, outputs)
    if benchmarks is not None:
        metrics.update(benchmarks.metrics())
    generations = [
        {
            "record_id": sample.get("record_id"),
            "prompt": sample["prompt"],
            "reference": sample["reference"],
            **_side_by_side(base, tuned),
            **image_fields(sample),
            **({"source": sample["source"]} if sample.get("source") else {}),
        }
        for sample, base, tuned in zip(
            samples, outputs["base"].generated, outputs["tuned"].generated, strict=True
        )
    ]
    generations += [
        {
            "record_id": call["record_id"],
            "task": "tool_call",
            "prompt": call["prompt"],
            "reference": json.dumps(call["reference"], ensure_ascii=False),
            **_side_by_side(base, tuned),
            **({"source": call["source"]} if call["source"] else {}),
        }
        for call, base, tuned in zip(
            calls, outputs["base"].called, outputs["tuned"].called, strict=True
        )
    ]
    plots = {
        "training_loss": plot_training_history(training_history),
        "token_lengths": plot_token_lengths(token_stats),
        "base_vs_tuned": plot_comparison(metrics),
    }
    return dict(sorted(metrics.items())), generations, plots


def _side_by_side(base: dict[str, Any], tuned: dict[str, Any]) -> dict[str, Any]:
    """Both models' completions of one prompt, as eval_generations.jsonl lists them."""
    return {
        "base_output": base["text"],
        "tuned_output": tuned["text"],
        "base_stopped": base["stopped"],
        "tuned_stopped": tuned["stopped"],
    }


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
    """Mean NLL, perplexity and argmax accuracy over every supervised token (token-weighted)."""
    if len(eval_tokens) == 0:
        return {}
    totals = supervised_totals(model, eval_tokens, batch_size)[""]
    return loss_metrics(totals.nll, totals.correct, totals.tokens)


def supervised_totals(
    model, eval_tokens, batch_size: int, groups: Sequence[str] | None = None
) -> dict[str, LossTotals]:
    """NLL, correct argmax and supervised-token totals per group of rows (`groups`: a source
    name per row; one group `""` without).

    Batches are padded by the trainer's collator and scored by the trainer's loss
    (`trainer.loss.causal_lm_loss`): the LM head runs only on supervised positions, in chunks.
    A batch holds rows of one group only, so each group's totals are its own rows' sums.
    """
    import torch

    from sft_pipeline.trainer.collator import DataCollatorForSFT
    from sft_pipeline.trainer.loss import causal_lm_loss

    groups = [""] * len(eval_tokens) if groups is None else list(groups)
    device = next(model.parameters()).device
    collate = DataCollatorForSFT(pad_token_id=0)
    lengths = [len(ids) for ids in eval_tokens["input_ids"]]
    rank = {name: k for k, name in enumerate(dict.fromkeys(groups))}
    # Longest first: similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(lengths)), key=lambda i: (rank[groups[i]], -lengths[i], i))
    totals = {name: LossTotals() for name in rank}
    with torch.inference_mode():
        for name in rank:
            for batch in batches([i for i in order if groups[i] == name], batch_size):
                rows = eval_tokens.select(batch)
                # Text rows: ids and labels; rows with images also their stored processor arrays.
                features = [{k: v for k, v in r.items() if k != "record_id"} for r in rows]
                padded = {k: v.to(device) for k, v in collate(features).items()}
                inputs = {k: v for k, v in padded.items() if k not in ("labels", "shift_labels")}
                if "pixel_values" in inputs:
                    dtype = next(model.parameters()).dtype
                    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
                nll, correct, count = causal_lm_loss(model, inputs, padded["shift_labels"])
                totals[name].add(nll.item(), int(correct), int(count))
    return totals
