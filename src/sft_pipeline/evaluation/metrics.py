"""What evaluation measures: metric names (which the report and the plots list) and the scores of
generated answers against references. No model and no torch here."""

from __future__ import annotations

import math
from typing import Any

LOSS_METRICS = ("eval_loss", "perplexity", "mean_token_accuracy")
GENERATION_METRICS = (
    "exact_match",
    "rouge_l",
    "chrf",
    "stopped_by_eos",
    "mean_generated_tokens",
)


def loss_metrics(nll: float, correct: int, tokens: int) -> dict[str, float]:
    """Mean NLL, perplexity and argmax accuracy from the totals over supervised tokens."""
    if tokens == 0:
        return {"num_tokens": 0}
    loss = nll / tokens
    return {
        "eval_loss": loss,
        "perplexity": math.exp(loss),
        "mean_token_accuracy": correct / tokens,
        "num_tokens": tokens,
    }


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


# --- reasoning ----------------------------------------------------------------------------------

# On held-out rows whose trained turn reasons (`reasoning` in eval_texts): the answer alone (what
# the generation writes after its reasoning block) against the reference answer, and the share of
# generations that close their block. A model that reasons well but never stops reasoning gives
# no answer at all, which the generation metrics on the whole text would hide.
REASONING_METRICS = (
    "answer_exact_match",
    "answer_rouge_l",
    "answer_chrf",
    "reasoning_closed_share",
)


def split_answer(text: str, prompt: str, tags: tuple[str, str]) -> tuple[str, bool]:
    """(the answer, whether the reasoning block was closed) of a generated text.

    The answer is what follows the last closing tag, as templates read it back from a reply. A
    text without a closing tag has no answer when it is inside a block (it opens one, or its
    prompt ends with the opening tag, as templates that start the reasoning for the model do);
    otherwise the model answered without reasoning and the whole text is its answer."""
    opening, closing = tags
    if closing in text:
        return text.rpartition(closing)[2].strip(), True
    inside = text.lstrip().startswith(opening) or prompt.rstrip().endswith(opening)
    return ("" if inside else text.strip()), False


def reasoning_scores(
    generated: list[dict[str, Any]],
    prompts: list[str],
    references: list[str],
    tags: tuple[str, str],
) -> dict[str, float]:
    """`REASONING_METRICS` of generations of reasoning rows (answer scores as `generation_scores`
    computes them, on the answers alone)."""
    if not generated:
        return {}
    split = [split_answer(g["text"], p, tags) for g, p in zip(generated, prompts, strict=True)]
    answers = [{**g, "text": answer} for g, (answer, _) in zip(generated, split, strict=True)]
    scores = generation_scores(answers, references)
    return {
        "answer_exact_match": scores["exact_match"],
        "answer_rouge_l": scores["rouge_l"],
        "answer_chrf": scores["chrf"],
        "reasoning_closed_share": sum(closed for _, closed in split) / len(split),
    }


# --- tool calls ---------------------------------------------------------------------------------

# On held-out rows whose reference turn calls tools: the share of generations whose call parses,
# names the reference's functions (in order), and also has their arguments (exact match of the
# parsed JSON).
TOOL_CALL_METRICS = ("tool_call_parsed", "tool_call_name_match", "tool_call_exact_match")


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The tool calls in a generated text, `[{"name", "arguments"}]`, or None when none parses.

    Templates wrap calls differently (`<tool_call>{...}</tool_call>`, `[TOOL_CALLS][{...}]`, a
    bare `{"name": ..., "parameters": ...}`), so the text is read as the model wrote it: every
    JSON object or list in it that is a call (an object with a string `name` and `arguments` or
    `parameters`), or a list of calls, in order. Arguments written as a JSON string are parsed.
    """
    import json

    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    position = 0
    while position < len(text):
        starts = [i for i in (text.find("{", position), text.find("[", position)) if i >= 0]
        if not starts:
            break
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        found = [_as_call(v) for v in (value if isinstance(value, list) else [value])]
        if found and all(c is not None for c in found):
            calls.extend(found)  # type: ignore[arg-type]
            position = end
        else:
            position = start + 1
    return calls or None


def _as_call(value: Any) -> dict[str, Any] | None:
    import json

    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if isinstance(value.get("function"), dict):  # OpenAI's shape
        return _as_call(value["function"])
    key = "arguments" if "arguments" in value else "parameters" if "parameters" in value else None
    if key is None:
        return None
    arguments = value[key]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return {"name": value["name"], "arguments": arguments}


def tool_call_scores(
    generated: list[dict[str, Any]], references: list[list[dict[str, Any]]]
) -> dict[str, float]:
    """`TOOL_CALL_METRICS` of generations against the reference calls of their rows."""
    if not generated:
        return {}
    parsed = [parse_tool_calls(g["text"]) for g in generated]
    pairs = list(zip(parsed, references, strict=True))
    n = len(pairs)
    return {
        "tool_call_parsed": sum(p is not None for p in parsed) / n,
        "tool_call_name_match": sum(
            p is not None and [c["name"] for c in p] == [c["name"] for c in ref] for p, ref in pairs
        )
        / n,
        "tool_call_exact_match": sum(
            p is not None
            and [(c["name"], c["arguments"]) for c in p]
            == [(c["name"], c["arguments"]) for c in ref]
            for p, ref in pairs
        )
        / n,
    }
