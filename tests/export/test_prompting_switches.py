"""The template's switches travel from training to every runtime that prompts the fine-tuned
model: the merged folder records them, `kedro sft chat|generate` render with them, and the Ollama
Modelfile renders the same text or says why it cannot.

With the real Qwen3 and SmolLM3 templates (on the fixture GPT-2 vocabulary with their control
tokens), every trained row of a multi-turn conversation with reasoning has, before its trained
turn's first label, exactly the ids chat feeds the model for the same conversation prefix, with
`template.enable_thinking` true and false.
"""

from __future__ import annotations

import datetime
import json
import logging

import pytest

from sft_pipeline.common.config import TemplateConfig
from sft_pipeline.common.labels import IGNORE_INDEX
from sft_pipeline.data.chat_templates import pinned_clock
from sft_pipeline.data.templating import Renderer
from sft_pipeline.data.turn_rows import record_rows
from sft_pipeline.export.chat import assistant_message, load_chat_model
from sft_pipeline.export.merge import MergedModel
from sft_pipeline.export.ollama import modelfile, probe_conversations, translate
from sft_pipeline.export.prompting import PROMPTING_FILE, PromptingFileError, read_prompting
from tests.conftest import CHATML_TEMPLATE, build_tiny_model, build_tiny_tokenizer
from tests.data.test_tool_templates import _fixture_template, _gpt2
from tests.data.test_turn_rows import THREE_TURNS, _jinja, _tokens

# Thinking on: every turn reasons. Thinking off: a record whose trained turn reasons is refused
# (its prompt would close the block), so the reasoning is in a context-only earlier turn.
CONTEXT_REASONING = [dict(m) for m in THREE_TURNS]
CONTEXT_REASONING[1]["train"] = False
for _turn in CONTEXT_REASONING[3::2]:
    del _turn["reasoning_content"]


def _tokenizer(fixtures_dir, name: str):
    tokenizer = _gpt2(fixtures_dir, ["<|im_start|>", "<|im_end|>"], added=("<think>", "</think>"))
    if name == "qwen3":
        tokenizer.chat_template = _fixture_template(fixtures_dir, "qwen3__tokenizer_config.json")
    else:
        tokenizer.chat_template = _jinja(fixtures_dir, "smollm3__chat_template.jinja")
    return tokenizer


@pytest.fixture(scope="module")
def tiny_model(fixtures_dir):
    """One tiny random model over the fixture vocabulary (both templates share it)."""
    return build_tiny_model("llama", len(_tokenizer(fixtures_dir, "qwen3")))


def _merged(tmp_path, tokenizer, model, cfg: TemplateConfig | None):
    """A merged folder as `merge_adapter` saves it: weights, tokenizer, the prompting record."""
    folder = tmp_path / "merged"
    MergedModel(model, tokenizer, "card", template_cfg=cfg).save_pretrained(folder)
    return folder


def _turn_prompts(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The ids before each trained turn's first label (a run of labels after -100)."""
    starts = [
        k
        for k, label in enumerate(labels)
        if label != IGNORE_INDEX and (k == 0 or labels[k - 1] == IGNORE_INDEX)
    ]
    return [ids[:k] for k in starts]


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("template", ["qwen3", "smollm3"])
def test_every_trained_rows_prompt_ids_are_the_ids_chat_feeds_the_model(
    fixtures_dir, tiny_model, tmp_path, template, thinking
):
    tokenizer = _tokenizer(fixtures_dir, template)
    cfg = TemplateConfig(enable_thinking=thinking)
    messages = THREE_TURNS if thinking else CONTEXT_REASONING
    rows = record_rows(Renderer(tokenizer, cfg), messages)
    chat = load_chat_model(_merged(tmp_path, tokenizer, tiny_model, cfg))

    trained = [k for k, m in enumerate(messages) if m["role"] == "assistant" and "train" not in m]
    ids, labels = _tokens(rows, tokenizer)
    prompts = [p for i, lab in zip(ids, labels, strict=True) for p in _turn_prompts(i, lab)]
    assert len(prompts) == len(trained)
    for prompt, turn in zip(prompts, trained, strict=True):
        assert prompt == chat.prompt_ids(messages[:turn])
    # Evaluation generates from each row's own prompt: the same text chat renders.
    for row in rows:
        turn = row.get("turn", trained[-1] + 1) - 1
        assert row["prompt"] == chat.prompt_text(messages[:turn])
    if template == "qwen3" and thinking:
        assert len(rows) == 3  # three assistant turns that drop earlier reasoning: three rows
    if not thinking:
        # The switch reached the template: the generation prompt closes an empty reasoning block.
        empty = "<think>\n\n</think>\n\n" if template == "qwen3" else "<think>\n\n</think>\n"
        assert chat.prompt_text(messages[:1]).endswith(f"<|im_start|>assistant\n{empty}")


def test_a_reply_that_reasons_goes_back_into_the_conversation_as_training_held_it(
    fixtures_dir, tiny_model, tmp_path
):
    """SmolLM3 never shows an earlier turn's reasoning in training; a reply the model wrote with
    its reasoning inline is kept apart, so chat's next prompt is the next trained row's."""
    tokenizer = _tokenizer(fixtures_dir, "smollm3")
    cfg = TemplateConfig()
    rows = record_rows(Renderer(tokenizer, cfg), THREE_TURNS)
    chat = load_chat_model(_merged(tmp_path, tokenizer, tiny_model, cfg))
    first = THREE_TURNS[1]
    reply = assistant_message(f"<think>\n{first['reasoning_content']}\n</think>\n\n4.")
    assert reply == {
        "role": "assistant",
        "content": "4.",
        "reasoning_content": "Two and two make four.",
    }
    history = [THREE_TURNS[0], reply, THREE_TURNS[2]]
    assert chat.prompt_text(history) == rows[1]["prompt"]


def test_the_merged_folder_records_enable_thinking_only_when_the_run_sets_it(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", len(tokenizer))
    default = _merged(tmp_path / "default", tokenizer, model, TemplateConfig())
    # A run that sets no switch writes the record it wrote before switches were recorded.
    assert (default / PROMPTING_FILE).read_text() == '{\n  "template_date": "2024-07-26"\n}\n'
    assert read_prompting(default) == TemplateConfig(chat_template="tokenizer")
    cfg = TemplateConfig(
        enable_thinking=False, date=datetime.date(2025, 1, 2), system_prompt="Be brief."
    )
    switched = _merged(tmp_path / "switched", tokenizer, model, cfg)
    assert json.loads((switched / PROMPTING_FILE).read_text()) == {
        "template_date": "2025-01-02",
        "enable_thinking": False,
        "system_prompt": "Be brief.",
    }
    assert read_prompting(switched) == TemplateConfig(
        chat_template="tokenizer",
        enable_thinking=False,
        date=datetime.date(2025, 1, 2),
        system_prompt="Be brief.",
    )
    # Chat prompts with the trained system prompt when the conversation brings none.
    chat = load_chat_model(switched)
    assert chat.prompt_text([{"role": "user", "content": "Hi"}]).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("record", "named"),
    [
        ('{"template_date": "2024-07-26", "enable_thinking": "no"}', "enable_thinking is 'no'"),
        ('{"template_date": "2024-07-26", "reasoning_effort": "high"}', "'reasoning_effort'"),
        ('{"template_date": "26 Jul 2024"}', "template_date '26 Jul 2024'"),
        ("not json", "not JSON"),
    ],
)
def test_a_bad_prompting_record_is_refused_naming_the_file_and_the_key(tmp_path, record, named):
    (tmp_path / PROMPTING_FILE).write_text(record)
    with pytest.raises(PromptingFileError) as caught:
        read_prompting(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / PROMPTING_FILE}: ")
    assert named in str(caught.value)


# --- the Ollama Modelfile -----------------------------------------------------------------------


def _jinja_prompt(tokenizer, messages, cfg: TemplateConfig) -> str:
    """What the Jinja template itself renders at inference with the run's switches."""
    switches = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
    with pinned_clock(tokenizer.chat_template, cfg.date):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **switches
        )


@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3s_modelfile_has_no_template_because_it_drops_earlier_reasoning(
    fixtures_dir, tiny_model, tmp_path, caplog, thinking
):
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.export.ollama"):
        comment = _refused(fixtures_dir, "qwen3", tiny_model, tmp_path, thinking)
    assert "No TEMPLATE: the chat template renders an earlier reply that reasons in a <think> " in (
        comment
    )
    assert "drops or moves the reasoning of earlier replies" in comment
    assert "chatml layout it otherwise follows" in comment
    assert "drops or moves the reasoning of earlier replies" in caplog.text


def _refused(fixtures_dir, family, tiny_model, tmp_path, thinking) -> str:
    """The comment of a Modelfile written with no TEMPLATE for `family`'s real template."""
    tokenizer = _tokenizer(fixtures_dir, family)
    folder = _merged(tmp_path, tokenizer, tiny_model, TemplateConfig(enable_thinking=thinking))
    text, name = modelfile(folder, "model-f16.gguf", [])
    assert name is None
    assert "\nTEMPLATE " not in text
    return " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))


@pytest.mark.parametrize("thinking", [None, False])
def test_smollm3s_modelfile_has_no_template_because_of_its_own_system_block(
    fixtures_dir, tiny_model, tmp_path, thinking
):
    """SmolLM3 opens every prompt with a metadata block of its own (the date, the reasoning mode,
    its instructions or the system message), left unclosed: no layout writes that."""
    comment = _refused(fixtures_dir, "smollm3", tiny_model, tmp_path, thinking)
    assert "No TEMPLATE: this model's chat template is none of ChatML, Phi-3/Phi-4 and Alpaca" in (
        comment
    )
    assert "for a user turn alone, from character 12 it writes 'system\\n## Metadata" in comment
    assert "where the nearest, chatml, writes 'user\\nWhat is 2 + 2?" in comment


# ChatML whose generation prompt closes an empty reasoning block when thinking is off, and whose
# default system message prints the day: what a fixed layout can express, once rendered with the
# switches of training.
SWITCHED_CHATML = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nToday is ' + "
    "strftime_now('%d %B %Y') + '.<|im_end|>\\n' }}{% endif %}"
    + CHATML_TEMPLATE.replace(
        "{{ '<|im_start|>assistant\\n' }}",
        "{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and not enable_thinking "
        "%}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}",
    )
)


@pytest.mark.parametrize("thinking", [None, False])
def test_a_layout_template_renders_as_the_jinja_template_with_the_trained_switches(
    tmp_path, thinking
):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = SWITCHED_CHATML
    model = build_tiny_model("llama", len(tokenizer))
    cfg = TemplateConfig(enable_thinking=thinking, date=datetime.date(2025, 1, 2))
    folder = _merged(tmp_path, tokenizer, model, cfg)
    layout, reason = translate(tokenizer, read_prompting(folder))
    assert reason == "" and layout.name == "chatml"
    for messages in probe_conversations():
        assert layout.render(messages) == _jinja_prompt(tokenizer, messages, cfg)
    empty = "<think>\n\n</think>\n\n" if thinking is False else ""
    assert layout.generation_prompt == f"<|im_start|>assistant\n{empty}"
    text, name = modelfile(folder, "model-f16.gguf", [])
    assert name == "chatml"
    assert f'{{{{ end }}}}<|im_start|>assistant\n{empty}"""' in text
    # The day training rendered with, whatever today is.
    assert 'SYSTEM """Today is 02 January 2025."""' in text


def test_the_trained_system_prompt_becomes_the_modelfiles_system(tmp_path):
    """Training gave every conversation without a system message the configured one; Ollama
    does the same with the Modelfile's SYSTEM."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model("llama", len(tokenizer))
    folder = _merged(tmp_path, tokenizer, model, TemplateConfig(system_prompt="Answer in French."))
    text, name = modelfile(folder, "model-f16.gguf", [])
    assert name == "chatml"
    assert 'SYSTEM """Answer in French."""' in text
    layout, _ = translate(tokenizer, read_prompting(folder))
    question = [{"role": "user", "content": "Hi"}]
    assert layout.render(question) == load_chat_model(folder).prompt_text(question)
