"""What evaluation measures: metric names (which the report and the plots list) and the scores of
generated answers against references. No model and no torch here."""

from __future__ import annotations

from typing import Any

LOSS_METRICS = ("eval_loss", "perplexity", "mean_token_accuracy")
GENERATION_METRICS = (
    "exact_match",
    "rouge_l",
    "chrf",
    "stopped_by_eos",
    "mean_generated_tokens",
)


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
