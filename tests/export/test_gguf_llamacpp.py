"""llama.cpp itself on exported files: every family the pipeline trains and llama.cpp runs,
with real tokenizers where the family has one. llama.cpp must tokenize the chat prompts as
training did (the ids training gave the same text) and predict the merged model's next token,
teacher-forced, at >= 95% of positions (the export's own check, which runs llama.cpp when its
client is installed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest

from sft_pipeline.common.config import ExportConfig
from sft_pipeline.export import llamacpp
from sft_pipeline.export.errors import ExportError
from sft_pipeline.export.gguf import export
from tests.conftest import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.skipif(
    llamacpp.unavailable() is not None, reason=f"llama.cpp: {llamacpp.unavailable()}"
)

# A Mistral/Llama-2 style template for SentencePiece tokenizers that ship none.
INST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True}


def tokenizer_for(name: str | None, fixtures: Path | None, work: Path, *, template: bool = True):
    """The fixture tokenizer `name` (None: the tiny one); without a chat template of its own it
    gets the `[INST]` one unless `template` is False."""
    from transformers import AutoTokenizer

    if name is None:
        return build_tiny_tokenizer()
    source = fixtures / "tokenizers" / name
    if name.startswith("mistral"):
        # The fixture holds raw SentencePiece models; a folder with tokenizer.model loads one.
        source = work / "tokenizer"
        source.mkdir()
        raw = {"mistral-v1": "tokenizer.model.v1", "mistral-v3": "*.model.v3"}[name]
        shutil.copy(
            next((fixtures / "tokenizers" / "mistral").glob(raw)), source / "tokenizer.model"
        )
        (source / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    tokenizer = AutoTokenizer.from_pretrained(source)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = INST_TEMPLATE
    return tokenizer


def merged(work: Path, family: str, tokenizer_name: str | None, fixtures, **overrides) -> Path:
    """A tiny random `family` model with the tokenizer, stop and pad tokens set as merged."""
    from sft_pipeline.export.merge import configure_special_tokens

    tokenizer = tokenizer_for(tokenizer_name, fixtures, work)
    model = build_tiny_model(family, len(tokenizer), **overrides)
    configure_special_tokens(model, tokenizer)
    model.save_pretrained(work / "merged")
    tokenizer.save_pretrained(work / "merged")
    return work / "merged"


CASES = [
    # family, real tokenizer (None: the tiny byte-level BPE with ChatML), config overrides
    ("llama", "llama-2", {}),
    ("mistral", "mistral-v1", {}),
    ("mistral", "mistral-v3", {}),
    ("phi3", "phi-3-mini", {}),
    ("phi", "phi-2", {}),
    ("gpt2", "gpt2", {}),
    ("qwen2", None, {}),
    ("qwen3", None, {}),
    ("gemma", None, GEMMA),
    ("gemma2", None, GEMMA),
    ("gemma3_text", None, GEMMA),
    ("gpt_neox", None, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "tokenizer_name", "overrides"), CASES)
def test_llama_cpp_tokenizes_chat_prompts_and_predicts_as_the_merged_model(
    family, tokenizer_name, overrides, tmp_path, request
):
    fixtures = request.getfixturevalue("fixtures_dir") if tokenizer_name else None
    folder = merged(tmp_path, family, tokenizer_name, fixtures, **overrides)
    exported = export(folder, ExportConfig(gguf=["f16"]))
    exported.save_pretrained(tmp_path / "export")  # fails below the f16 threshold itself
    check = exported.summary["gguf"]["f16"]["check"]
    assert check["by"] == "llama.cpp"
    assert check["tokenization"] == "identical"
    assert check["agreement"] >= 0.95, check
    written = json.loads((tmp_path / "export" / "export.json").read_text())
    assert written["gguf"]["f16"]["check"] == check


def test_sentencepiece_vocabulary_is_written_with_scores_and_byte_tokens(tmp_path, fixtures_dir):
    folder = merged(tmp_path, "mistral", "mistral-v3", fixtures_dir)
    export(folder, ExportConfig(gguf=["f16"], check=False)).save_pretrained(tmp_path / "e")
    reader = gguf.GGUFReader(tmp_path / "e" / "model-f16.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE
    assert types[tokens.index("[INST]")] == gguf.TokenType.CONTROL
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    assert scores[tokens.index("▁the")] < 0  # made by a merge: -rank


def test_a_file_below_its_threshold_fails_the_export_naming_it(tmp_path, monkeypatch):
    from sft_pipeline.export import gguf as gguf_export

    folder = merged(tmp_path, "llama", None, None)
    monkeypatch.setitem(gguf_export.MIN_AGREEMENT, "q4_0", 1.01)
    with pytest.raises(ExportError, match=r"model-q4_0\.gguf: [01]\.\d+ < 1\.01 \(llama\.cpp\)"):
        export(folder, ExportConfig(gguf=["q4_0"])).save_pretrained(tmp_path / "export")


def test_k_quants_come_from_llama_cpps_quantizer(tmp_path):
    folder = merged(tmp_path, "llama", None, None, hidden_size=256, intermediate_size=512)
    out = tmp_path / "export"
    export(folder, ExportConfig(gguf=["Q4_K_M"], check=False)).save_pretrained(out)
    reader = gguf.GGUFReader(out / "model-Q4_K_M.gguf")
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert not list(out.glob("*.source.gguf"))
