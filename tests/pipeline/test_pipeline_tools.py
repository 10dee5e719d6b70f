"""Agent data end to end: `kedro run --pipeline=sft` on LLaMA-Factory's glaive tool-call demo and
an OpenAI-format tool dataset, with parameters only (one run reads both)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk

from tests import project_copy as pc

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def _openai_row(city: str, name: str = "get_weather", arguments: str | None = None) -> dict:
    arguments = json.dumps({"city": city}) if arguments is None else arguments
    return {
        "messages": [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{city}",
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": f"call_{city}", "content": '{"temp": 20}'},
            {"role": "assistant", "content": f"It is 20 degrees in {city}."},
        ],
        "tools": [WEATHER],
    }


def _openai_file(path: Path) -> Path:
    cities = ["Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo", "Quito", "Seoul"]
    rows = [_openai_row(city) for city in cities]
    rows.append(_openai_row("Bern", arguments='{"city": "Bern"'))  # malformed arguments
    rows.append(_openai_row("Kyiv", name="get_time"))  # undeclared function
    orphan = _openai_row("Riga")
    del orphan["messages"][1]  # a result that answers no call
    rows.append(orphan)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_agent_datasets_train_and_evaluate_with_parameters_only(tmp_path, fixtures_dir):
    project = pc.make_project(tmp_path / "project")
    openai = _openai_file(project / "data/01_raw/agent_openai.jsonl")
    glaive = fixtures_dir / "datasets/llamafactory/glaive_toolcall_en_demo.json"
    pc.set_params(
        project,
        {
            "data": {"path": [str(glaive), str(openai)], "eval_fraction": 0.1},
            # The tiny model's tokenizer has no chat template with tools: the built-in one.
            "template": {"chat_template": "hermes"},
            # glaive's demo file holds 35 exact copies of earlier records.
            "validation": {"max_rejected_fraction": 0.2},
            "tokenization": {"max_seq_length": 1024},
            "evaluation": {"max_samples": 2, "max_new_tokens": 8, "batch_size": 2},
        },
    )
    pc.run([sys.executable, "-m", "kedro", "run", "--pipeline=sft", "--env", pc.TINY_ENV], project)
    reporting = project / "data/08_reporting"

    report = json.loads((reporting / "validation_report.json").read_text())
    assert report["ingested"] == 300 + 11 == report["valid"] + report["rejected"]
    # No record is rejected for its tool turns; the three bad agent records are, with reasons.
    assert report["reasons"] == {
        "duplicate": 35,
        "malformed_tool_call": 1,
        "undeclared_function": 1,
        "orphan_tool_result": 1,
    }
    rejected = [json.loads(line) for line in (reporting / "rejected_records.jsonl").open()]
    bad = {r["source_row"]: r["reasons"] for r in rejected if r["source_file"].endswith(".jsonl")}
    assert sorted(bad) == [9, 10, 11]
    assert bad[9][0].startswith("malformed_tool_call: message 2 (assistant): tool call 1 ")
    assert bad[10][0].startswith("undeclared_function: message 2 (assistant): tool call 1 ")
    assert bad[11][0].startswith("orphan_tool_result: message 2 (tool) answers no tool call")

    # Labels: calls and replies supervised, tool results and tool definitions never.
    tokens = load_from_disk(str(project / "data/05_model_input/train_tokens"))
    texts = [json.loads(line) for line in (project / "data/04_feature/train_texts.jsonl").open()]
    by_id = {t["record_id"]: t for t in texts}
    calls = 0
    for row in tokens:
        segments = by_id[row["record_id"]]["segments"]
        supervised = "".join(s["text"] for s in segments if s["supervised"])
        unsupervised = "".join(s["text"] for s in segments if not s["supervised"])
        assert "<tool_response>" not in supervised and "<tools>" not in supervised
        calls += supervised.count("<tool_call>")
        assert ("<tool_response>" in unsupervised) == ("<tool_call>" in supervised)
    assert calls > 150

    metrics = json.loads((reporting / "metrics.json").read_text())
    assert metrics["num_tool_call_samples"] == 2
    for side in ("base", "tuned"):
        for key in ("tool_call_parsed", "tool_call_name_match", "tool_call_exact_match"):
            assert 0.0 <= metrics[f"{side}/{key}"] <= 1.0
    html = (reporting / "report.html").read_text()
    assert "tool call: right function and arguments" in html
