"""The evaluation and report plots (matplotlib Figures, saved as PNG by the catalog)."""

from __future__ import annotations

from typing import Any

from sft_pipeline.evaluation.metrics import GENERATION_METRICS, LOSS_METRICS, TOOL_CALL_METRICS


def new_figure(title: str):
    """A titled Figure with one set of axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    # A bare Figure (not pyplot) is not registered globally: nothing leaks between calls.
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    return figure, axes


def finish(figure, axes, drawn: bool, empty: str, labels: tuple[str, str]):
    """A legend for what was drawn, or a note saying there was nothing to draw; axis labels."""
    if drawn:
        axes.legend()
    else:
        axes.text(0.5, 0.5, empty, ha="center", va="center")
    axes.set_xlabel(labels[0])
    axes.set_ylabel(labels[1])
    return figure


def plot_training_history(history: list[dict[str, Any]]):
    figure, axes = new_figure("Training loss")
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(h["step"], h[key]) for h in history or [] if h.get(key) is not None]
        if points:
            axes.plot(*zip(*points, strict=True), style, label=key)
    return finish(figure, axes, bool(axes.lines), "no loss logged", ("step", "loss"))


def plot_token_lengths(token_stats: dict[str, Any]):
    """Per-split histograms from token_stats["splits"][name]["length_histogram"]."""
    figure, axes = new_figure("Tokens per row")
    for split, stats in sorted(((token_stats or {}).get("splits") or {}).items()):
        histogram = stats.get("length_histogram") or {}
        edges, counts = histogram.get("bin_edges"), histogram.get("counts")
        if edges and counts:
            label = f"{split} ({stats.get('rows_kept', sum(counts))} rows)"
            axes.stairs(counts, edges, fill=True, alpha=0.5, label=label)
    empty = "no length histogram in token_stats"
    return finish(figure, axes, bool(axes.patches), empty, ("tokens", "rows"))


def plot_comparison(metrics: dict[str, Any]):
    figure, axes = new_figure("Base vs tuned (eval split)")
    keys = (*LOSS_METRICS, *GENERATION_METRICS, *TOOL_CALL_METRICS)
    names = [k for k in keys if f"base/{k}" in metrics]
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
