"""The SentencePiece space prefix of a GGUF file, decided from the prompt training renders."""

from __future__ import annotations

import pytest

from sft_pipeline.common.config import ExportConfig
from sft_pipeline.export.errors import ExportError
from sft_pipeline.export.gguf import export
from tests.conftest import build_tiny_model
from tests.export.test_gguf_llamacpp import tokenizer_for


def test_a_chat_template_that_cannot_render_a_prompt_stops_the_export_naming_it(
    tmp_path, fixtures_dir
):
    tokenizer = tokenizer_for("llama-2", fixtures_dir, tmp_path, template=False)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    build_tiny_model("llama", len(tokenizer)).save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    exported = export(tmp_path / "merged", ExportConfig(gguf=["f16"], check=False))
    with pytest.raises(ExportError, match=r"space prefix.*roles must alternate"):
        exported.save_pretrained(tmp_path / "export")
