"""The export's self-check (`gguf_check`) against llama.cpp: it compares llama.cpp's tokens with
the ids training used for the same text, and scores a model that stops as agreeing when the file
stops there too."""

from __future__ import annotations

import pytest

from sft_pipeline.common.config import ExportConfig
from sft_pipeline.export import gguf_vocab, llamacpp
from sft_pipeline.export.errors import ExportError
from sft_pipeline.export.gguf import export
from tests.conftest import build_tiny_model, build_tiny_tokenizer
from tests.export.test_gguf_llamacpp import tokenizer_for

pytestmark = pytest.mark.skipif(
    llamacpp.unavailable() is not None, reason=f"llama.cpp: {llamacpp.unavailable()}"
)


def test_the_check_fails_a_file_llama_cpp_tokenizes_unlike_training(
    tmp_path, fixtures_dir, monkeypatch
):
    """Llama-2 with a template that writes BOS: training encodes `<s>[INST]` as `<s> ▁[`; a
    file without llama.cpp's space prefix gives `<s> [`, which a plain `tokenizer(text)` of the
    whole prompt also gives, so only a comparison with training's ids catches it."""
    from sft_pipeline.model.stop_tokens import configure_special_tokens

    tokenizer = tokenizer_for("llama-2", fixtures_dir, tmp_path)  # the [INST] template
    model = build_tiny_model("llama", len(tokenizer))
    configure_special_tokens(model, tokenizer)
    model.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    monkeypatch.setattr(gguf_vocab, "space_prefix", lambda tok, scheme: False, raising=False)
    with pytest.raises(ExportError, match=r"model-f16\.gguf: llama\.cpp tokenizes .*training"):
        export(tmp_path / "merged", ExportConfig(gguf=["f16"])).save_pretrained(tmp_path / "e")


def test_a_model_that_stops_at_once_agrees_with_a_file_that_stops_there_too(tmp_path):
    """A final norm of zero makes every logit 0, so the argmax is token 0, made the stop token:
    the merged model answers every prompt by stopping, and so does its file. Scored on what the
    model generates freely, that is full agreement over one position per prompt (with the stop
    token suppressed the reference would run on where the file stops: no agreement at all)."""
    from sft_pipeline.export.check_prompts import HELD_OUT_PROMPTS
    from sft_pipeline.model.stop_tokens import configure_special_tokens

    tokenizer = build_tiny_tokenizer()
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(0)
    model = build_tiny_model("llama", len(tokenizer))
    model.model.norm.weight.data.zero_()
    model.generation_config.eos_token_id = model.config.eos_token_id = 0
    eos_ids, _ = configure_special_tokens(model, tokenizer)
    assert eos_ids[0] == 0
    model.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    exported = export(tmp_path / "merged", ExportConfig(gguf=["f16"]))
    exported.save_pretrained(tmp_path / "e")
    check = exported.summary["gguf"]["f16"]["check"]
    assert check["by"] == "llama.cpp"
    assert check["agreement"] == 1.0
    assert check["positions"] == len(HELD_OUT_PROMPTS)
