"""Nothing depends on the day: templates that print a date see `template.date`, pinned both as
`date_string` and as `strftime_now`, so renders under different system dates are identical."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sft_pipeline.common.config import TemplateConfig
from tests.conftest import PROJECT_ROOT
from tests.data.rows import render_messages

# The date logic of Meta's Llama 3.1/3.2/3.3 chat templates, around a ChatML body our tiny
# tokenizer can tokenize: `date_string` when the caller passes one, else the real clock.
LLAMA3_DATE_TEMPLATE = (
    "{%- if not date_string is defined %}"
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}{%- endif %}"
    "{{- '<|im_start|>system\\nCutting Knowledge Date: December 2023\\nToday Date: ' "
    "+ date_string + '<|im_end|>\\n' }}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
DATES = ("2026-12-03 10:00:00", "2031-02-17 23:59:30")


def _smollm3_template(fixtures_dir: Path) -> Path:
    # A real template that calls strftime_now("%d %B %Y") itself.
    return fixtures_dir / "tokenizers" / "chat_templates" / "smollm3__chat_template.jinja"


def test_template_date_is_passed_as_date_string(tiny_tokenizer, tmp_path):
    path = tmp_path / "llama3.jinja"
    path.write_text(LLAMA3_DATE_TEMPLATE)
    cfg = TemplateConfig(chat_template=str(path), date=datetime.date(2025, 3, 9))
    text = "".join(
        s["text"] for s in render_messages(CONVERSATION, tiny_tokenizer, cfg)["segments"]
    )
    assert "Today Date: 09 Mar 2025" in text
    default = TemplateConfig(chat_template=str(path))
    text = "".join(
        s["text"] for s in render_messages(CONVERSATION, tiny_tokenizer, default)["segments"]
    )
    assert "Today Date: 26 Jul 2024" in text


def test_strftime_now_returns_template_date_and_is_restored_after(tiny_tokenizer, fixtures_dir):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _smollm3_template(fixtures_dir)
    cfg = TemplateConfig(chat_template=str(template), date=datetime.date(2025, 3, 9))
    row = render_messages(CONVERSATION, tiny_tokenizer, cfg)
    assert "Today Date: 09 March 2025" in "".join(s["text"] for s in row["segments"])
    # Other callers of the same template outside our renders still see the real clock.
    env = _compile_jinja_template(template.read_text()).environment
    assert env.globals["strftime_now"]("%Y") == str(datetime.date.today().year)


@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime is not installed")
@pytest.mark.parametrize("template", ["smollm3", "llama3"])
def test_renders_under_two_system_dates_give_the_same_texts_tokens_and_fingerprint(
    template, fixtures_dir, tmp_path
):
    if template == "smollm3":
        path = _smollm3_template(fixtures_dir)
    else:
        path = tmp_path / "llama3.jinja"
        path.write_text(LLAMA3_DATE_TEMPLATE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "src"), str(PROJECT_ROOT)]),
    }
    # The two processes run side by side, each in its own faked present.
    runs = [
        subprocess.Popen(
            ["faketime", date, sys.executable, "-m", "tests.data.render_on_a_date", str(path)],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for date in DATES
    ]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    first, second = results
    # faketime really changed the date each process saw.
    assert [first["today"], second["today"]] == [d.split()[0] for d in DATES]
    assert first["texts"] == second["texts"]
    assert "26 July 2024" in first["texts"][0] or "26 Jul 2024" in first["texts"][0]
    assert first["input_ids"] == second["input_ids"]
    assert first["fingerprint"] == second["fingerprint"]
