"""Rendering never hangs a run: a render worker killed mid-batch, or a template that loops on one
record, fails the run within seconds, naming the batch or the record."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from sft_pipeline.common.config import DataConfig, TemplateConfig
from sft_pipeline.data import rendering, streams
from sft_pipeline.data.ingestion import ingest_to_parquet
from sft_pipeline.data.templating import ChatTemplateError

# ChatML, except that a message reading "slow" makes it count to 10^10 (sandboxed Jinja caps one
# range at 10^5, so two nested ones).
SLOW_ON_SLOW = (
    "{% for message in messages %}"
    "{% if message['content'] == 'slow' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def slow_records(tmp_path, monkeypatch):
    """12 records in 4 row groups of 3; record 8 (row group 3) makes the template loop."""
    monkeypatch.setattr(streams, "ROW_GROUP_ROWS", 3)
    rows = [{"prompt": f"q {i}", "response": f"Paris {i}"} for i in range(12)]
    rows[7]["prompt"] = "slow"
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return ingest_to_parquet(DataConfig(path=str(path)))


@pytest.fixture
def slow_tokenizer(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = SLOW_ON_SLOW
    return tokenizer


def render_workers() -> list:
    import psutil

    return [p for p in psutil.Process().children() if p.is_running()]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_template_that_loops_on_a_record_fails_the_run_naming_the_record(
    slow_records, slow_tokenizer, monkeypatch, workers
):
    monkeypatch.setenv("SFT_PIPELINE_RENDER_WORKERS", workers)
    monkeypatch.setenv("SFT_PIPELINE_RENDER_TIMEOUT_S", "1")
    started = time.monotonic()
    with pytest.raises(ChatTemplateError) as exc:
        rendering.render_stream(slow_records, slow_tokenizer, TemplateConfig())
    took = time.monotonic() - started
    message = str(exc.value)
    assert "d.jsonl, row 8" in message
    assert "took more than 1 s (SFT_PIPELINE_RENDER_TIMEOUT_S)" in message
    assert took < 15, took
    assert render_workers() == []  # none left behind


def test_a_killed_render_worker_fails_the_run_within_seconds_naming_the_batch(
    slow_records, slow_tokenizer, monkeypatch
):
    monkeypatch.setenv("SFT_PIPELINE_RENDER_WORKERS", "2")
    monkeypatch.setenv("SFT_PIPELINE_RENDER_TIMEOUT_S", "600")  # the loop alone would not end
    killed_at: list[float] = []

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 60
        while len(render_workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # both busy: one of them in the looping record
        victim = render_workers()[0]
        killed_at.append(time.monotonic())
        os.kill(victim.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    with pytest.raises(rendering.RenderWorkerError) as exc:
        rendering.render_stream(slow_records, slow_tokenizer, TemplateConfig())
    failed_after = time.monotonic() - killed_at[0]
    killer.join()
    print(f"render failed {failed_after:.2f} s after a worker was killed")
    message = str(exc.value)
    assert "render worker process ended" in message
    assert "d.jsonl, row" in message and "batch " in message
    assert failed_after < 5
    time.sleep(0.5)
    assert render_workers() == []  # the looping worker was stopped too
