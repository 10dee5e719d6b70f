"""Tool-call metrics: the generated call parses, names the right function, has the reference
arguments; on written examples and on a tiny model's own greedy generations."""

from __future__ import annotations

import json

import pytest

from sft_pipeline.common.config import EvaluationConfig, TemplateConfig
from sft_pipeline.data.templating import Renderer
from sft_pipeline.evaluation.metrics import parse_tool_calls, tool_call_scores

PARIS = [{"name": "get_weather", "arguments": {"city": "Paris"}}]


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3.1
        '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}]',  # Mistral
        'Let me check. {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
        '{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}',
    ],
)
def test_calls_parse_whatever_the_template_wraps_them_in(text):
    assert parse_tool_calls(text) == PARIS


def test_scores_tell_malformed_wrong_function_and_wrong_arguments_apart():
    outputs = [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',
        "It is sunny in Paris.",
    ]
    scores = tool_call_scores([{"text": t} for t in outputs], [PARIS] * len(outputs))
    assert scores == {
        "tool_call_parsed": 3 / 5,
        "tool_call_name_match": 2 / 5,
        "tool_call_exact_match": 1 / 5,
    }


TARGETS = {
    "Paris": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "Oslo": '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>',
    "Rome": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"\n</tool_call>',
}


def test_metrics_on_a_tiny_models_generations(tiny_tokenizer):
    """A tiny model taught three answers (some 60 steps on them alone) generates them greedily:
    a right call, a call to the wrong function, a malformed call."""
    import torch

    from sft_pipeline.evaluation.generation import generate
    from tests.conftest import build_tiny_model

    tokenizer = tiny_tokenizer
    renderer = Renderer(tokenizer, TemplateConfig(chat_template="hermes"))
    prompts, rows = [], []
    for city, target in TARGETS.items():
        prompt = renderer.render([{"role": "user", "content": f"Weather in {city}?"}], True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        target_ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        prompts.append(prompt)
        rows.append((prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    model = build_tiny_model("llama", len(tokenizer))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    model.eval()
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    cfg = EvaluationConfig(max_new_tokens=72, batch_size=3)
    generated = generate(model, tokenizer, prompts, stop, cfg)
    assert [g["text"] for g in generated] == list(TARGETS.values())
    reference = {"Paris": PARIS, "Oslo": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    reference["Rome"] = [{"name": "get_weather", "arguments": {"city": "Rome"}}]
    scores = tool_call_scores(generated, [reference[c] for c in TARGETS])
    assert scores == {
        "tool_call_parsed": 2 / 3,
        "tool_call_name_match": 1 / 3,
        "tool_call_exact_match": 1 / 3,
    }
    assert json.loads(json.dumps(scores)) == scores  # as metrics.json holds them
