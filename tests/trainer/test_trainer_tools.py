"""Agent data in our SFTTrainer: TRL's `tools` column and `tool_calls` messages give TRL 1.16's
`input_ids` for the same chat template; the labels differ on purpose (data_prep's module doc).

TRL trains on every token of a conversation by default: the tool schemas in the system turn and
the tool results too. We supervise only what the model must generate, the assistant's calls and
replies with their end-of-turn tokens, and end rows at their last supervised token.
"""

from __future__ import annotations

import json

import pytest

from tests.data.test_tool_records import WEATHER
from tests.trainer.test_trainer_dataset_types import our_rows, trl_rows

TOOLS = [{"type": "function", "function": WEATHER}]


def _row(city: str, temp: int, tools_as_string: bool) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": city}},
                    }
                ],
            },
            {"role": "tool", "name": "get_weather", "content": json.dumps({"temp": temp})},
            {"role": "assistant", "content": f"It is {temp} degrees in {city}."},
        ],
        "tools": json.dumps(TOOLS) if tools_as_string else TOOLS,
    }


@pytest.fixture(scope="module")
def qwen_setup(fixtures_dir):
    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = fixtures_dir / "tokenizers" / "chat_templates" / "qwen2.5__tokenizer_config.json"
    tokenizer.chat_template = json.loads(config.read_text())["chat_template"]
    return build_tiny_model("qwen2", len(tokenizer)), tokenizer


@pytest.mark.parametrize("tools_as_string", [False, True])
def test_tool_rows_give_trl_input_ids_and_supervise_only_calls_and_replies(
    qwen_setup, tmp_path, tools_as_string
):
    data = [_row("Paris", 21, tools_as_string), _row("Oslo", 4, tools_as_string)]
    ours = our_rows(qwen_setup, tmp_path, data, max_length=4096)
    theirs = trl_rows(qwen_setup, tmp_path, data, max_length=4096)
    tokenizer = qwen_setup[1]
    for (o_ids, o_labels), (t_ids, t_labels), row in zip(ours, theirs, data, strict=True):
        # The same text, token for token; ours ends at the reply's <|im_end|> (TRL keeps "\n").
        assert t_ids[: len(o_ids)] == o_ids
        assert tokenizer.decode(t_ids[len(o_ids) :]) == "\n"
        # TRL (default) supervises every token; we supervise the call and the reply only.
        assert t_labels == t_ids
        city = row["messages"][0]["content"].split(" in ")[1].rstrip("?")
        temp = json.loads(row["messages"][2]["content"])["temp"]
        runs, run = [], []
        for token, label in zip(o_ids, o_labels, strict=True):
            if label == -100:
                if run:
                    runs.append(tokenizer.decode(run))
                run = []
            else:
                assert label == token
                run.append(token)
        runs.append(tokenizer.decode(run))
        call = {"name": "get_weather", "arguments": {"city": city}}
        assert runs == [
            f"<tool_call>\n{json.dumps(call)}\n</tool_call><|im_end|>",
            f"It is {temp} degrees in {city}.<|im_end|>",
        ]
        unsupervised = tokenizer.decode(
            [t for t, label in zip(o_ids, o_labels, strict=True) if label == -100]
        )
        assert '"description": "Current weather in a city"' in unsupervised
        assert f"<tool_response>\n{json.dumps({'temp': temp})}\n</tool_response>" in unsupervised
