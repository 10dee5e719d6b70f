"""Evaluate the base and the merged model side by side on the held-out split.

Two kinds of metrics: teacher-forced loss, perplexity and token accuracy on the supervised tokens
of `eval_tokens` (the exact labels training used), and free generation on the prompts of
`eval_texts` (greedy, batched with left padding) scored against the reference answers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sft_pipeline.common.config import EvaluationConfig, QuantizationConfig
from sft_pipeline.data.tokenization import encode_texts
from sft_pipeline.model.loading import load_model, load_tokenizer

log = logging.getLogger(__name__)

LOSS_METRICS = ("eval_loss", "perplexity", "mean_token_accuracy")
GENERATION_METRICS = (
    "exact_match",
    "rouge_l",
    "chrf",
    "stopped_by_eos",
    "mean_generated_tokens",
)


def evaluate(
    base_model_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    eval_texts: list[dict[str, Any]],
    eval_tokens,
    training_history: list[dict[str, Any]],
    token_stats: dict[str, Any],
    cfg: EvaluationConfig,
    base_quantization: QuantizationConfig | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """-> (flat metrics, generations side by side, {name: matplotlib Figure}).

    One model is in memory at a time. `base_quantization` (the 4-bit settings when training was
    QLoRA) loads the base in 4-bit on CUDA, as training held it, so evaluation needs no more
    memory than training did.
    """
    import torch

    samples = [row for row in eval_texts if row.get("prompt") and row.get("reference")]
    samples = samples[: cfg.max_samples]
    log.info(
        "evaluating on %d tokenized rows and %d of %d prompts (rows without a reference are"
        " language-modelling text and are scored by loss only)",
        len(eval_tokens),
        len(samples),
        len(eval_texts),
    )
    merged_tokenizer = load_tokenizer(merged_dir)
    stop_ids = _eos_ids(Path(merged_dir))
    metrics: dict[str, Any] = {
        "num_eval_rows": len(eval_tokens),
        "num_generation_samples": len(samples),
    }
    outputs: dict[str, list[dict[str, Any]]] = {}
    for name, model_dir in (("base", Path(base_model_dir)), ("tuned", Path(merged_dir))):
        torch.manual_seed(0)
        tokenizer = merged_tokenizer if name == "tuned" else load_tokenizer(model_dir)
        quantization = base_quantization if name == "base" and _on_cuda() else None
        model = load_model(model_dir, quantization=quantization).eval()
        loss = supervised_loss(model, eval_tokens, cfg.batch_size)
        generated = generate(
            model, tokenizer, [s["prompt"] for s in samples], stop_ids, cfg, desc=name
        )
        scores = generation_scores(generated, [s["reference"] for s in samples])
        metrics.update({f"{name}/{k}": v for k, v in {**loss, **scores}.items()})
        outputs[name] = generated
        del model
    metrics["num_supervised_tokens"] = metrics.pop("base/num_tokens", 0)
    metrics.pop("tuned/num_tokens", None)
    for key in (*LOSS_METRICS, *GENERATION_METRICS):
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
        }
        for sample, base, tuned in zip(samples, outputs["base"], outputs["tuned"], strict=True)
    ]
    plots = {
        "training_loss": plot_training_history(training_history),
        "token_lengths": plot_token_lengths(token_stats),
        "base_vs_tuned": plot_comparison(metrics),
    }
    return dict(sorted(metrics.items())), generations, plots


def _on_cuda() -> bool:
    from sft_pipeline.model.device import on_cuda

    return on_cuda()


def _eos_ids(model_dir: Path) -> list[int]:
    """The merged model's stop tokens (EOS plus end-of-turn), used for both models alike."""
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    if eos is None:
        raise ValueError(f"{model_dir}/generation_config.json defines no eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos)


# --- loss on supervised tokens ------------------------------------------------------------------


def _batches(rows: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(rows), size):
        yield list(rows[start : start + size])


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
        for batch in _batches(order, batch_size):
            rows = eval_tokens.select(batch)
            features = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
            padded = {k: v.to(device) for k, v in collate(features).items()}
            inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
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


# --- generation ---------------------------------------------------------------------------------


def generate(
    model,
    tokenizer,
    prompts: list[str],
    stop_ids: list[int],
    cfg: EvaluationConfig,
    *,
    desc: str = "",
) -> list[dict[str, Any]]:
    """Greedy completions, batched with left padding; each {text, stopped, num_tokens}.

    A progress bar (prompts done, per model: `desc`) shows on stderr: generation is the
    longest part of an evaluation.
    """
    import torch
    from tqdm.auto import tqdm

    if not prompts:
        return []
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    stop_set = set(stop_ids)
    # Longest prompts first reduces padding; results go back to the input order.
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    by_index: dict[int, dict[str, Any]] = {}
    progress = tqdm(total=len(prompts), desc=f"generating {desc}".strip(), unit="prompt")
    with torch.inference_mode(), progress:
        for batch in _batches(order, cfg.batch_size):
            # Tokenized exactly as training tokenized them (a leading BOS split off first, as
            # `encode_texts` does), then left-padded.
            ids, _ = encode_texts(tokenizer, [prompts[i] for i in batch])
            enc = tokenizer.pad(
                {"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt"
            ).to(device)
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
            for i, tokens in zip(batch, new_tokens, strict=True):
                end = next((k for k, t in enumerate(tokens) if t in stop_set), None)
                kept = tokens if end is None else tokens[:end]
                by_index[i] = {
                    "text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    "stopped": end is not None,
                    "num_tokens": len(kept) + (end is not None),
                }
            progress.update(len(batch))
    return [by_index[i] for i in range(len(prompts))]


def generation_scores(generated: list[dict[str, Any]], references: list[str]) -> dict[str, float]:
    """Exact match, ROUGE-L F1 (mean over samples), corpus chrF (0-100), EOS share, length."""
    if not generated:
        return {}
    import sacrebleu
    from rouge_score import rouge_scorer

    texts = [g["text"] for g in generated]
    refs = [r.strip() for r in references]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [
        scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(refs, texts, strict=True)
    ]
    n = len(texts)
    return {
        "exact_match": sum(h == r for h, r in zip(texts, refs, strict=True)) / n,
        "rouge_l": sum(rouge) / n,
        "chrf": float(sacrebleu.corpus_chrf(texts, [refs]).score),
        "stopped_by_eos": sum(g["stopped"] for g in generated) / n,
        "mean_generated_tokens": sum(g["num_tokens"] for g in generated) / n,
    }


# --- plots --------------------------------------------------------------------------------------


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    # A bare Figure (not pyplot) is not registered globally: nothing leaks between calls.
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    return figure, axes


def _finish(figure, axes, drawn: bool, empty: str, labels: tuple[str, str]):
    """A legend for what was drawn, or a note saying there was nothing to draw; axis labels."""
    if drawn:
        axes.legend()
    else:
        axes.text(0.5, 0.5, empty, ha="center", va="center")
    axes.set_xlabel(labels[0])
    axes.set_ylabel(labels[1])
    return figure


def plot_training_history(history: list[dict[str, Any]]):
    figure, axes = _figure("Training loss")
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(h["step"], h[key]) for h in history or [] if h.get(key) is not None]
        if points:
            axes.plot(*zip(*points, strict=True), style, label=key)
    return _finish(figure, axes, bool(axes.lines), "no loss logged", ("step", "loss"))


def plot_token_lengths(token_stats: dict[str, Any]):
    """Per-split histograms from token_stats["splits"][name]["length_histogram"]."""
    figure, axes = _figure("Tokens per row")
    for split, stats in sorted(((token_stats or {}).get("splits") or {}).items()):
        histogram = stats.get("length_histogram") or {}
        edges, counts = histogram.get("bin_edges"), histogram.get("counts")
        if edges and counts:
            label = f"{split} ({stats.get('rows_kept', sum(counts))} rows)"
            axes.stairs(counts, edges, fill=True, alpha=0.5, label=label)
    empty = "no length histogram in token_stats"
    return _finish(figure, axes, bool(axes.patches), empty, ("tokens", "rows"))


def plot_comparison(metrics: dict[str, Any]):
    figure, axes = _figure("Base vs tuned (eval split)")
    names = [k for k in (*LOSS_METRICS, *GENERATION_METRICS) if f"base/{k}" in metrics]
    # Put every metric on a comparable axis: chrF is 0-100, lengths are token counts.
    scale = {"chrf": 0.01}
    labels = [f"{k} (/100)" if k in scale else k for k in names]
    width = 0.4
    for offset, model in ((-width / 2, "base"), (width / 2, "tuned")):
        values = [metrics[f"{model}/{k}"] * scale.get(k, 1.0) for k in names]
        axes.bar([i + offset for i in range(len(names))], values, width, label=model)
    axes.set_xticks(range(len(names)), labels, rotation=30, ha="right")
    axes.set_yscale("symlog")
    axes.legend()
    return figure
