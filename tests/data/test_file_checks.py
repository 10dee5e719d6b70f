"""Files are checked before they are read: a FIFO, a device, a folder or a socket named as an
image or a data file is rejected with a reason naming its path, never opened for reading.

Each check runs in a forked child with a time limit and a memory limit, so that a regression
(a read that blocks on a FIFO, or reads /dev/zero until memory runs out) fails the test instead
of hanging it or exhausting the machine.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sft_pipeline.common.config import DataConfig, ValidationConfig
from sft_pipeline.common.errors import InputFileError
from sft_pipeline.data import file_checks
from tests.data.rows import ingest, validate

HANG_S = 10.0  # far above what a check takes; only a read that blocks reaches it
MEMORY = 2 * 2**30  # what the child may allocate beyond what it has at the fork


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def bounded(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(what `fn` returns or the error it raises, as text; seconds it took) in a forked child
    bounded in time and memory: a child that does not answer within HANG_S fails the test."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        limit = _vm_bytes() + MEMORY
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        start = time.monotonic()
        try:
            result = fn()
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        send.send((result, time.monotonic() - start))

    process = context.Process(target=child, daemon=True)
    process.start()
    answered = receive.poll(HANG_S)
    if not answered:
        process.kill()
        process.join()
        pytest.fail(f"no answer within {HANG_S:g} s: a read blocked or ran away")
    result, seconds = receive.recv()
    process.join()
    return result, seconds


def _image_record(tmp_path: Path, image: str) -> Path:
    data = tmp_path / "vqa.jsonl"
    row = {
        "messages": [
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A cat."},
        ],
        "images": [image],
    }
    data.write_text(json.dumps(row) + "\n")
    return data


def _reasons(data: Path) -> list[str]:
    records = ingest(DataConfig(path=str(data)))
    _valid, rejected, _report = validate(records, ValidationConfig())
    return [reason for row in rejected for reason in row["reasons"]]


@pytest.fixture
def warm(tmp_path):
    """Ingestion and validation run once on a real image first, so the timed child measures
    the checks, not the first imports."""
    folder = tmp_path / "warm"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "cat.png")
    assert _reasons(_image_record(folder, "cat.png")) == []


def test_a_fifo_named_as_an_image_is_rejected_within_a_second_naming_it(tmp_path, warm):
    (tmp_path / "img").mkdir()
    os.mkfifo(tmp_path / "img" / "pipe.png")
    data = _image_record(tmp_path, "img/pipe.png")
    reasons, seconds = bounded(lambda: _reasons(data))
    assert isinstance(reasons, list), reasons
    assert len(reasons) == 1 and reasons[0].startswith("image_unreadable"), reasons
    assert "img/pipe.png" in reasons[0] and "a FIFO" in reasons[0], reasons
    assert seconds < 1.0


def test_dev_zero_named_as_an_image_is_rejected_without_reading_it(tmp_path, warm):
    data = _image_record(tmp_path, "/dev/zero")
    reasons, _seconds = bounded(lambda: _reasons(data))
    assert isinstance(reasons, list), reasons
    assert len(reasons) == 1 and reasons[0].startswith("image_unreadable"), reasons
    assert "/dev/zero" in reasons[0] and "a character device" in reasons[0], reasons


def test_a_folder_named_as_an_image_is_rejected_naming_it(tmp_path):
    (tmp_path / "img" / "album.png").mkdir(parents=True)
    reasons = _reasons(_image_record(tmp_path, "img/album.png"))
    assert len(reasons) == 1 and "img/album.png" in reasons[0] and "a folder" in reasons[0]


def test_an_image_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "cat.png")
    size = (tmp_path / "cat.png").stat().st_size
    monkeypatch.setattr(file_checks, "MAX_IMAGE_FILE_BYTES", size - 1)
    read: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: read.append(str(p)) or real_open(p, *a, **k))
    records = ingest(DataConfig(path=str(_image_record(tmp_path, "cat.png"))))
    part = json.loads(records["messages"][0])[0]["content"][0]
    assert part["sha256"] is None  # not hashed: never opened
    assert not any(p.endswith("cat.png") for p in read)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "socket"])
def test_a_data_file_that_is_not_a_regular_file_stops_ingestion_naming_it(tmp_path, kind):
    path = tmp_path / "data.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
        expected = "a FIFO"
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
        expected = "a character device"
    else:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        expected = "a socket"
    message, _seconds = bounded(lambda: ingest(DataConfig(path=str(path))))
    assert isinstance(message, str) and message.startswith(InputFileError.__name__), message
    assert "data.jsonl" in message and expected in message and "not a regular file" in message


def test_a_data_file_over_the_size_limit_stops_ingestion_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    monkeypatch.setattr(file_checks, "MAX_DATA_FILE_BYTES", 10)
    with pytest.raises(InputFileError, match=r"data\.jsonl.*bytes, over MAX_DATA_FILE_BYTES=10"):
        ingest(DataConfig(path=str(path)))
