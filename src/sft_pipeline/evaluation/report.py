"""The run report: one self-contained HTML page to look at after a run.

It reads only the run's reports (metrics, training history and summary, token statistics,
validation report, generations; for a mixture also the rendered rows, counted per source) and
draws:

    +-------------------------------------------------------------+
    | header: model, method, steps, rows kept / rejected          |
    | metrics: base | tuned | change, per metric                  |
    | mixture only: per source, counts and the same metrics       |
    | training loss curve          | learning-rate curve          |
    | token-length histogram       | rejected records by reason   |
    | generations: prompt | reference | base | tuned              |
    +-------------------------------------------------------------+

Self-contained means it opens offline and from an e-mail attachment: CSS inline, charts as
base64 PNG data URIs, no script and no link to anything outside the file.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jinja2 import Environment

from sft_pipeline.evaluation.benchmark_table import benchmark_rows
from sft_pipeline.evaluation.scoring import PER_SOURCE

# The page (Jinja, autoescaped), shipped beside this module as package data.
PAGE_FILE = Path(__file__).with_name("report.html.jinja")

# Metric key -> (label, higher is better). The order is the table's.
METRICS = {
    "eval_loss": ("eval loss", False),
    "perplexity": ("perplexity", False),
    "mean_token_accuracy": ("token accuracy", True),
    "exact_match": ("exact match", True),
    "rouge_l": ("ROUGE-L", True),
    "chrf": ("chrF", True),
    "stopped_by_eos": ("stopped by EOS", True),
    "mean_generated_tokens": ("generated tokens (mean)", None),
    "tool_call_parsed": ("tool call parses", True),
    "tool_call_name_match": ("tool call: right function", True),
    "tool_call_exact_match": ("tool call: right function and arguments", True),
    "answer_exact_match": ("answer after reasoning: exact match", True),
    "answer_rouge_l": ("answer after reasoning: ROUGE-L", True),
    "answer_chrf": ("answer after reasoning: chrF", True),
    "reasoning_closed_share": ("reasoning block closed", True),
}
MAX_GENERATIONS = 20


def render_report(
    metrics: dict[str, Any],
    training_history: list[dict[str, Any]],
    training_summary: dict[str, Any],
    token_stats: dict[str, Any],
    validation_report: dict[str, Any],
    eval_generations: list[dict[str, Any]],
    train_texts: Iterable[dict[str, Any]] = (),
    eval_texts: Iterable[dict[str, Any]] = (),
) -> str:
    """The report page as an HTML string. `train_texts` and `eval_texts` (rendered rows) are
    read only for a mixture, to count each source's rows."""
    from sft_pipeline.evaluation.plots import plot_token_lengths, plot_training_history

    charts = {
        "Training loss": png_data_uri(plot_training_history(training_history)),
        "Learning rate": png_data_uri(plot_learning_rate(training_history)),
        "Tokens per row": png_data_uri(plot_token_lengths(token_stats)),
    }
    page = PAGE_FILE.read_text(encoding="utf-8")
    template = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string(page)
    return template.render(
        facts=run_facts(training_summary or {}, validation_report or {}, token_stats or {}),
        metric_rows=metric_rows(metrics or {}),
        benchmarks=benchmark_report_rows(metrics or {}),
        counts=_counts(metrics or {}),
        sources=source_rows(validation_report or {}, train_texts, eval_texts),
        source_metrics=source_metric_rows(metrics or {}),
        charts=charts,
        rejections=rejection_rows(validation_report or {}, token_stats or {}),
        generations=generation_rows(eval_generations or []),
        total_generations=len(eval_generations or []),
    )


def source_rows(
    validation_report: dict[str, Any],
    train_texts: Iterable[dict[str, Any]],
    eval_texts: Iterable[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Per source of a mixture (none for one source): its records as validation counted them
    (read, rejected, valid) and its rendered rows (train, eval; a record drawn twice by the
    mixture, or trained as one row per turn, is several rows), with its share of the train rows.
    """
    counted = validation_report.get("sources") or {}
    if len(counted) < 2:
        return []
    train, held_out = _rows_per_source(train_texts), _rows_per_source(eval_texts)
    total = sum(train.values())
    return [
        {
            "name": name,
            "ingested": c.get("ingested"),
            "rejected": c.get("rejected"),
            "valid": c.get("valid"),
            "train_rows": train[name],
            "eval_rows": held_out[name],
            "share": f"{train[name] / total:.1%}" if total else "",
        }
        for name, c in counted.items()
    ]


def _rows_per_source(texts: Iterable[dict[str, Any]]) -> Counter[str]:
    return Counter(row.get("source", "") for row in texts)


def source_metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Per source of a mixture (`per_source` in metrics.json): its counts and metric rows."""
    return [
        {
            "name": name,
            "eval_rows": m.get("num_eval_rows"),
            "samples": m.get("num_generation_samples"),
            "rows": metric_rows(m),
        }
        for name, m in (metrics.get(PER_SOURCE) or {}).items()
    ]


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric both models have: label, values, change and which side is better."""
    rows = []
    for key, (label, higher_better) in METRICS.items():
        base, tuned = metrics.get(f"base/{key}"), metrics.get(f"tuned/{key}")
        if base is None or tuned is None:
            continue
        better = None
        if higher_better is not None and base != tuned:
            better = "tuned" if (tuned > base) == higher_better else "base"
        rows.append(
            {
                "key": key,
                "label": label,
                "base": _fmt(base),
                "tuned": _fmt(tuned),
                "delta": _fmt(tuned - base, signed=True),
                "better": better,
            }
        )
    return rows


def benchmark_report_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark table: per task and metric, each side with its 95% interval, the change with
    its own, and whether it is beyond two standard errors (the significance the table marks)."""
    rows = []
    for row in benchmark_rows(metrics):
        cells = {}
        for side in ("base", "tuned", "delta"):
            ci, signed = row.get(f"{side}_ci"), side == "delta"
            interval = f"[{_fmt(ci[0], signed=signed)}, {_fmt(ci[1], signed=signed)}]" if ci else ""
            cells[side] = (_fmt(row[side], signed=signed), interval)
        higher = row.get("higher_is_better")
        better = None
        if row["significant"] and higher is not None:
            better = "tuned" if (row["delta"] > 0) == higher else "base"
        rows.append(
            {
                "task": row["task"],
                "metric": row["metric"],
                "prompt": "chat template" if row.get("chat_template") else "plain",
                "samples": row.get("samples"),
                "cells": cells,
                "significant": row["significant"],
                "better": better,
            }
        )
    return rows


def rejection_rows(
    validation_report: dict[str, Any], token_stats: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rejected records per (stage, reason): validation codes, then tokenization reasons."""
    rows = [
        {"stage": "validation", "reason": reason, "count": count}
        for reason, count in (validation_report.get("reasons") or {}).items()
    ]
    for split, stats in sorted((token_stats.get("splits") or {}).items()):
        reasons = Counter(r.get("reason", "?") for r in stats.get("rejected_rows") or [])
        rows.extend(
            {"stage": f"tokenization ({split})", "reason": reason, "count": count}
            for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        )
    return rows


def generation_rows(generations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for g in generations[:MAX_GENERATIONS]:
        reference = (g.get("reference") or "").strip()
        rows.append(
            {
                "prompt": g.get("prompt", ""),
                "reference": reference,
                "base": g.get("base_output", ""),
                "tuned": g.get("tuned_output", ""),
                "base_match": _matches(g, g.get("base_output") or "", reference),
                "tuned_match": _matches(g, g.get("tuned_output") or "", reference),
                # Vision-language samples: each image's thumbnail (a data: URI) and source.
                "images": list(zip(g.get("thumbnails") or [], g.get("images") or [], strict=False)),
            }
        )
    return rows


def _matches(generation: dict[str, Any], output: str, reference: str) -> bool:
    """Exact match; for a tool-call row, the parsed calls equal the reference calls."""
    if generation.get("task") == "tool_call":
        from sft_pipeline.evaluation.metrics import tool_call_scores

        scores = tool_call_scores([{"text": output}], [json.loads(reference)])
        return scores["tool_call_exact_match"] == 1.0
    return output.strip() == reference


def run_facts(
    summary: dict[str, Any], validation: dict[str, Any], token_stats: dict[str, Any]
) -> list[tuple[str, Any]]:
    """(label, value) pairs for the header line; what a run did not record is left out."""
    splits = token_stats.get("splits") or {}
    facts = [
        ("method", summary.get("method")),
        ("precision", summary.get("precision")),
        ("steps", summary.get("global_step")),
        ("train rows", (splits.get("train") or {}).get("rows_kept")),
        ("eval rows", (splits.get("eval") or {}).get("rows_kept")),
        ("records ingested", validation.get("ingested")),
        ("rejected", validation.get("rejected")),
    ]
    runtime = summary.get("train_runtime_s")
    if runtime:
        facts.append(("training time", f"{runtime:.0f} s"))
    return [(label, value) for label, value in facts if value is not None]


def _counts(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "generation_samples": metrics.get("num_generation_samples"),
        "tool_call_samples": metrics.get("num_tool_call_samples"),
        "reasoning_samples": metrics.get("num_reasoning_samples"),
        "supervised_tokens": metrics.get("num_supervised_tokens"),
    }


def _fmt(value: Any, *, signed: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def plot_learning_rate(history: list[dict[str, Any]]):
    from sft_pipeline.evaluation.plots import new_figure

    figure, axes = new_figure("Learning rate")
    points = [
        (h["step"], h["learning_rate"]) for h in history or [] if h.get("learning_rate") is not None
    ]
    if points:
        axes.plot(*zip(*points, strict=True), "-", color="tab:green")
    else:
        axes.text(0.5, 0.5, "no learning rate logged", ha="center", va="center")
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate")
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return figure


def png_data_uri(figure) -> str:
    """A matplotlib figure as a `data:image/png;base64,...` URI (same figure, same bytes)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
