"""Evaluation per source and per part: metrics.json's `per_source` mapping, the answer metrics of
reasoning rows, and the report's per-source tables, from small constructed inputs (no model)."""

from __future__ import annotations

import math

import pytest

from sft_pipeline.evaluation.metrics import reasoning_scores, split_answer
from sft_pipeline.evaluation.report import render_report, source_rows
from sft_pipeline.evaluation.scoring import (
    PER_SOURCE,
    LossTotals,
    Scored,
    SideOutputs,
    split_metrics,
)
from tests.data.test_turn_rows import THREE_TURNS, qwen3, smollm3  # noqa: F401  (fixtures)

TAGS = ("<think>", "</think>")


def _gen(text: str, stopped: bool = True, tokens: int = 4) -> dict:
    return {"text": text, "stopped": stopped, "num_tokens": tokens}


def _sample(reference: str, source: str = "", **extra) -> dict:
    return {"prompt": "<|im_start|>assistant\n", "reference": reference, "source": source, **extra}


def _two_sources() -> tuple[Scored, dict[str, SideOutputs]]:
    """Three token rows (two of `chat`, one of `math`) and one prompt per source; the base gets
    both answers wrong, the tuned model gets `chat` right."""
    scored = Scored(
        row_sources=["chat", "math", "chat"],
        samples=[_sample("Paris", "chat"), _sample("4", "math")],
        calls=[],
    )
    outputs = {
        "base": SideOutputs(
            {"chat": LossTotals(6.0, 2, 4), "math": LossTotals(3.0, 0, 2)},
            [_gen("Lyon"), _gen("5", stopped=False)],
        ),
        "tuned": SideOutputs(
            {"chat": LossTotals(2.0, 3, 4), "math": LossTotals(3.0, 1, 2)},
            [_gen("Paris"), _gen("5")],
        ),
    }
    return scored, outputs


def test_each_source_gets_the_whole_splits_metrics_on_its_own_rows():
    metrics = split_metrics(*_two_sources())
    chat, math_ = metrics[PER_SOURCE]["chat"], metrics[PER_SOURCE]["math"]
    assert list(metrics[PER_SOURCE]) == ["chat", "math"]
    assert (chat["num_eval_rows"], math_["num_eval_rows"], metrics["num_eval_rows"]) == (2, 1, 3)
    assert (chat["num_supervised_tokens"], math_["num_supervised_tokens"]) == (4, 2)
    assert chat["base/eval_loss"] == 1.5 and chat["tuned/eval_loss"] == 0.5
    assert chat["delta/eval_loss"] == -1.0
    assert chat["tuned/perplexity"] == pytest.approx(math.exp(0.5))
    assert math_["tuned/mean_token_accuracy"] == 0.5
    assert (chat["tuned/exact_match"], math_["tuned/exact_match"]) == (1.0, 0.0)
    assert (chat["base/stopped_by_eos"], math_["base/stopped_by_eos"]) == (1.0, 0.0)
    # The whole split sums every source's tokens: (6 + 3) / 6 and (2 + 3) / 6.
    assert metrics["base/eval_loss"] == 1.5 and metrics["tuned/eval_loss"] == pytest.approx(5 / 6)
    assert metrics["tuned/exact_match"] == 0.5 and metrics["num_supervised_tokens"] == 6
    assert set(chat) == {k for k in metrics if k != PER_SOURCE}


def test_one_source_gives_exactly_the_keys_metrics_json_has_always_had():
    scored = Scored(row_sources=["", ""], samples=[_sample("Paris"), _sample("4")], calls=[])
    outputs = {
        side: SideOutputs({"": LossTotals(4.0, 3, 8)}, [_gen("Paris"), _gen("5")])
        for side in ("base", "tuned")
    }
    metrics = split_metrics(scored, outputs)
    measured = ("eval_loss", "perplexity", "mean_token_accuracy", "exact_match", "rouge_l", "chrf",
                "stopped_by_eos", "mean_generated_tokens")  # fmt: skip
    assert set(metrics) == {
        "num_eval_rows",
        "num_generation_samples",
        "num_supervised_tokens",
        *(f"{side}/{key}" for side in ("base", "tuned", "delta") for key in measured),
    }
    assert metrics["base/eval_loss"] == 0.5 and metrics["base/mean_token_accuracy"] == 3 / 8
    assert metrics["num_supervised_tokens"] == 8 and metrics["base/exact_match"] == 0.5


def test_the_answer_is_what_follows_the_reasoning_block():
    assert split_answer("<think>\n2+2\n</think>\n\n4", "", TAGS) == ("4", True)
    # Still reasoning when generation stopped: no answer, even if the reasoning names it.
    assert split_answer("<think>\nit is 4", "", TAGS) == ("", False)
    # A template that opens the block in the prompt: the generation starts inside it.
    assert split_answer("it is 4", "<|im_start|>assistant\n<think>\n", TAGS) == ("", False)
    assert split_answer("it is 4</think>4", "<|im_start|>assistant\n<think>\n", TAGS) == (
        "4",
        True,
    )
    # No block at all: the model answered without reasoning.
    assert split_answer("4", "<|im_start|>assistant\n", TAGS) == ("4", False)
    assert split_answer("[r]x[/r] 4", "", ("[r]", "[/r]")) == ("4", True)


def test_reasoning_rows_score_the_answer_alone_and_the_share_of_closed_blocks():
    generated = [_gen("<think>\nParis, surely.\n</think>\n\nParis"), _gen("<think>\nHmm, Paris")]
    scores = reasoning_scores(generated, ["", ""], ["Paris", "Paris"], TAGS)
    assert scores["reasoning_closed_share"] == 0.5
    assert scores["answer_exact_match"] == 0.5
    assert scores["answer_rouge_l"] == 0.5


def test_reasoning_metrics_appear_only_where_scored_rows_reason():
    scored, outputs = _two_sources()
    samples = [dict(scored.samples[0], reasoning=True), scored.samples[1]]
    outputs["tuned"].generated[0] = _gen("<think>\nThe capital.\n</think>\n\nParis")
    outputs["base"].generated[0] = _gen("<think>\nThe capital is")
    metrics = split_metrics(Scored(scored.row_sources, samples, []), outputs)
    chat, math_ = metrics[PER_SOURCE]["chat"], metrics[PER_SOURCE]["math"]
    assert metrics["num_reasoning_samples"] == chat["num_reasoning_samples"] == 1
    assert (chat["base/reasoning_closed_share"], chat["tuned/reasoning_closed_share"]) == (0, 1)
    assert chat["tuned/answer_exact_match"] == 1.0 and chat["delta/answer_exact_match"] == 1.0
    # On the whole text the reasoning hides the right answer.
    assert chat["tuned/exact_match"] == 0.0
    assert not any("answer" in k or "reasoning" in k for k in math_)
    assert metrics["tuned/reasoning_closed_share"] == 1.0


def test_the_report_shows_each_sources_counts_and_metrics_for_a_mixture():
    validation = {
        "ingested": 13,
        "rejected": 3,
        "sources": {
            "chat": {"ingested": 8, "valid": 7, "rejected": 1},
            "math": {"ingested": 5, "valid": 3, "rejected": 2},
        },
    }
    train = [{"source": "chat"}] * 6 + [{"source": "math"}] * 2
    held_out = [{"source": "chat"}, {"source": "math"}]
    rows = source_rows(validation, train, held_out)
    assert rows == [
        {"name": "chat", "ingested": 8, "rejected": 1, "valid": 7, "train_rows": 6,
         "eval_rows": 1, "share": "75.0%"},
        {"name": "math", "ingested": 5, "rejected": 2, "valid": 3, "train_rows": 2,
         "eval_rows": 1, "share": "25.0%"},
    ]  # fmt: skip
    page = render_report(
        split_metrics(*_two_sources()), [], {}, {}, validation, [], train, held_out
    )
    assert 'id="sources"' in page and 'id="source-metrics"' in page
    assert '<tr data-source="math" data-metric="eval_loss">' in page
    assert '<td>math</td><td class="num">5</td>' in page


def test_the_report_of_one_source_has_no_per_source_part_and_reads_no_texts():
    class Unread:
        def __iter__(self):
            raise AssertionError("the texts of a one-source run are not read")

    metrics = split_metrics(
        Scored([""], [_sample("Paris")], []),
        {
            side: SideOutputs({"": LossTotals(1.0, 1, 2)}, [_gen("Paris")])
            for side in ("base", "tuned")
        },
    )
    validation = {"ingested": 3, "rejected": 0}
    page = render_report(metrics, [], {}, {}, validation, [], Unread(), Unread())
    assert page == render_report(metrics, [], {}, {}, validation, [])
    assert "Per source" not in page and 'id="metrics"' in page


@pytest.mark.parametrize("template", ["qwen3", "smollm3"])
def test_what_a_reasoning_row_trains_the_model_to_write_splits_into_its_reference(
    template, request
):
    """With the real Qwen3 and SmolLM3 templates, each trained turn's supervised text (as the
    model would write it, up to its end-of-turn token) closes its reasoning block and leaves
    exactly the row's reference answer: the answer metrics compare like with like."""
    from sft_pipeline.common.config import TemplateConfig
    from sft_pipeline.data.templating import Renderer
    from sft_pipeline.data.turn_rows import record_rows

    tokenizer = request.getfixturevalue(template)
    rows = record_rows(Renderer(tokenizer, TemplateConfig()), THREE_TURNS)
    assert len(rows) == 3
    for row in rows:
        text = "".join(s["text"] for s in row["segments"])
        written = text[len(row["prompt"]) :].split("<|im_end|>")[0].strip()
        assert row["reasoning"] is True
        assert split_answer(written, row["prompt"], TAGS) == (row["reference"], True)
