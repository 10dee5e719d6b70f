"""Whether a template supports tools is decided by the structure of its renderings, never by a
substring: the tool definitions must add each function's name and parameters (present with
`tools=`, absent without), and each tool result must come out exactly where a unique marker in
its place comes out. Text that merely mentions a function name, or a short result ("21",
"Paris") that the conversation repeats elsewhere, proves nothing.
"""

from __future__ import annotations

import json

import pytest

from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.data.templating import ChatTemplateError, Renderer, builtin_template
from tests.conftest import build_tiny_tokenizer
from tests.data.test_tool_records import WEATHER
from tests.data.test_tool_templates import _fixture_template, _gpt2

TOOLS = [{"type": "function", "function": WEATHER}]
MENTIONS = [
    {"role": "user", "content": "Can get_weather tell me about the city of Paris?"},
    {"role": "assistant", "content": "Yes: get_weather takes a city."},
]


def call(result: str, reply: str, city: str = "Paris") -> list[dict]:
    return [
        {"role": "user", "content": f"What is the temperature in {city}? Is it 21?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": city}},
                }
            ],
        },
        {"role": "tool", "content": result},
        {"role": "assistant", "content": reply},
    ]


def _gemma(fixtures_dir):
    tokenizer = _gpt2(fixtures_dir, ["<start_of_turn>", "<end_of_turn>"])
    tokenizer.chat_template = _fixture_template(fixtures_dir, "gemma__tokenizer_config.json")
    return tokenizer, TemplateConfig()


def _without(branch: str):
    """The built-in hermes template with one of its tool branches taken out (a template
    written without that part of tool support)."""
    tokenizer = build_tiny_tokenizer()
    template = builtin_template("hermes")
    if branch == "results":
        branch = "{%- elif message['role'] == 'tool' -%}"
        start = template.index(branch) + len(branch)
        end = template.index("{%- else -%}", start)
        template = template[:start] + "\n" + template[end:]  # tool turns write nothing
    else:  # the tool definitions' parameters: only the names are written
        template = template.replace("(tool | tojson)", "tool['function']['name']")
    assert template != builtin_template("hermes")
    tokenizer.chat_template = template
    return tokenizer, TemplateConfig()


@pytest.mark.parametrize("template", ["gemma", "chatml"])
def test_a_template_without_tool_support_refuses_a_record_whose_text_mentions_its_function(
    fixtures_dir, template
):
    if template == "gemma":
        tokenizer, cfg = _gemma(fixtures_dir)
    else:
        tokenizer, cfg = build_tiny_tokenizer(), TemplateConfig(chat_template="chatml")
    renderer = Renderer(tokenizer, cfg)
    assert "get_weather" in renderer.render(MENTIONS, False, TOOLS)
    with pytest.raises(ChatTemplateError, match=r"tool definitions.*not rendered.*get_weather"):
        renderer.row(MENTIONS, tools=TOOLS)


def test_a_template_that_writes_tool_names_without_their_parameters_is_refused():
    tokenizer, cfg = _without("parameters")
    with pytest.raises(ChatTemplateError, match=r"parameters of 'get_weather'.*'city'"):
        Renderer(tokenizer, cfg).row(MENTIONS, tools=TOOLS)


@pytest.mark.parametrize(
    ("result", "reply"),
    [("21", "It is 21 degrees in Paris."), ("Paris", "The weather station is in Paris.")],
)
def test_a_short_tool_result_is_checked_by_marker_not_found_elsewhere_in_the_text(result, reply):
    tokenizer, cfg = _without("results")
    messages = call(result, reply)
    assert result in Renderer(tokenizer, cfg).render(messages, False, TOOLS)
    with pytest.raises(ChatTemplateError, match=r"tool results are not rendered \(message 3\)"):
        Renderer(tokenizer, cfg).row(messages, tools=TOOLS)


@pytest.mark.parametrize("result", ["21", "Paris", '{"temp": 21, "sky": "clear"}'])
def test_templates_with_tool_support_render_short_results_where_their_markers_were(
    fixtures_dir, result
):
    qwen = _gpt2(
        fixtures_dir, ["<|im_start|>", "<|im_end|>"], added=("<tool_call>", "</tool_call>")
    )
    qwen.chat_template = _fixture_template(fixtures_dir, "qwen2.5__tokenizer_config.json")
    for tokenizer, cfg in [
        (qwen, TemplateConfig()),
        (build_tiny_tokenizer(), TemplateConfig(chat_template="hermes")),
    ]:
        row = Renderer(tokenizer, cfg).row(call(result, "It is 21 degrees."), tools=TOOLS)
        assert f"<tool_response>\n{result}\n</tool_response>" in row["prompt"]
        assert json.dumps(TOOLS[0]) in row["prompt"]


def test_a_record_without_tools_renders_as_before_with_a_template_without_tool_support(
    fixtures_dir,
):
    tokenizer, cfg = _gemma(fixtures_dir)
    row = Renderer(tokenizer, cfg).row(MENTIONS)
    assert "get_weather takes a city" in "".join(s["text"] for s in row["segments"])
