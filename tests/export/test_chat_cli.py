"""`kedro sft generate` and `kedro sft chat` on a tiny model, through the real `kedro` command."""

from __future__ import annotations

import io
import json
import subprocess

import pytest

from sft_pipeline.export.chat import ChatSession, PromptFileError, load_chat_model, read_prompts
from tests import project_copy as pc
from tests.export.test_export import merged_folder

TOKENS = ["--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return merged_folder(tmp_path_factory.mktemp("merged"))


@pytest.mark.slow  # a real `kedro` process: its start-up alone takes ~15 s on 2 cores
def test_kedro_sft_generate_writes_one_answer_per_prompt(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        "What is the capital of France?",
        {"prompt": "Convert the record to JSON: name Alice", "system": "Answer briefly."},
        {"messages": [{"role": "user", "content": "Write a haiku."}]},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    args = ["--model", str(model_dir), "--prompts", str(prompts), "-o", str(out)]
    pc.run(
        [str(pc.VENV_BIN / "kedro"), "sft", "generate", *args, *TOKENS],
        pc.PROJECT_ROOT,
        timeout=180,
    )
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == len(rows)
    assert answers[1]["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert all(isinstance(a["response"], str) and a["num_tokens"] >= 1 for a in answers)


@pytest.mark.slow
def test_kedro_sft_chat_answers_a_piped_question_and_exits_at_end_of_input(model_dir):
    proc = subprocess.run(
        [str(pc.VENV_BIN / "kedro"), "sft", "chat", "--model", str(model_dir), *TOKENS],
        cwd=pc.PROJECT_ROOT,
        env=pc.env(),
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), proc.stderr[-3000:]


def test_chat_session_keeps_the_conversation_and_streams_each_reply(model_dir):
    chat = load_chat_model(model_dir)
    session = ChatSession(chat, system="Be brief.", max_new_tokens=6)
    out = io.StringIO()
    assert session.run(["Hello", "", "And again?"], out) == 2
    roles = [m["role"] for m in session.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    # What streamed out is the replies, one line each.
    streamed = [line.strip() for line in out.getvalue().splitlines()]
    assert streamed == [m["content"] for m in session.messages if m["role"] == "assistant"]
    # The prompt of a turn is the chat template with the generation prompt.
    assert chat.prompt_text(session.messages[:2]).endswith("<|im_start|>assistant\n")
    session.run(["/reset"], out)
    assert session.messages == []


def test_prompt_files_take_jsonl_or_text_and_name_a_bad_line(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond {json-looking}\n")
    assert read_prompts(text) == [
        [{"role": "user", "content": "first"}],
        [{"role": "user", "content": "second {json-looking}"}],
    ]
    bad = tmp_path / "p.jsonl"
    bad.write_text('"ok"\n{"question": "no prompt key"}\n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2"):
        read_prompts(bad)


def test_chat_prompts_with_the_date_the_model_was_trained_with(model_dir, tmp_path):
    """A merged folder records `template.date`; chat renders date-printing templates with it
    (whatever today is), and with the default date for a folder that records none."""
    import datetime

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_pipeline.common.config import TemplateConfig
    from sft_pipeline.export.merge import MergedModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = (
        "Today Date: {{ date_string }}\n{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    day = datetime.date(2025, 1, 2)
    dated_cfg = TemplateConfig(date=day)
    MergedModel(model, tokenizer, "card", template_cfg=dated_cfg).save_pretrained(
        tmp_path / "dated"
    )
    MergedModel(model, tokenizer, "card").save_pretrained(tmp_path / "undated")
    question = [{"role": "user", "content": "Hi"}]
    dated = load_chat_model(tmp_path / "dated").prompt_text(question)
    assert dated.startswith("Today Date: 02 Jan 2025\n")
    undated = load_chat_model(tmp_path / "undated").prompt_text(question)
    assert undated.startswith("Today Date: 26 Jul 2024\n")
