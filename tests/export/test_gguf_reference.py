"""Our GGUF files against llama.cpp's own converter and llama.cpp itself, per exported family.

For each family a tiny random model with a real tokenizer is merged folder-style
(`save_pretrained`, as `merge_model` saves it, with the template training used as its chat
template), then written twice: by our exporter and by llama.cpp's `convert_hf_to_gguf.py`. The
files are compared on what llama.cpp reads (every `tokenizer.ggml.*` key, the tensors after
dequantization) and on what llama.cpp does with them: its tokens for the rendered training
prompts must be the ids training used for the same text (BOS as in training).

Where the converter cannot read the folder transformers saved, the test says so (it is why our
writer, not the converter, exports that family); for the tensors it then gets the
SentencePiece model it asks for (Llama-2's, the base vocabulary of Phi-3).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from sft_pipeline.common.config import ExportConfig, TemplateConfig
from sft_pipeline.export import gguf_reference, llamacpp
from sft_pipeline.export.errors import ExportError
from sft_pipeline.export.gguf import export
from tests.conftest import build_tiny_model
from tests.export.test_gguf_llamacpp import tokenizer_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        llamacpp.unavailable() is not None, reason=f"llama.cpp: {llamacpp.unavailable()}"
    ),
    pytest.mark.skipif(
        gguf_reference.unavailable() is not None,
        reason=f"llama.cpp's converter: {gguf_reference.unavailable()}",
    ),
]

GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True}


def _template(fixtures: Path, name: str) -> str:
    from sft_pipeline.data.templating import builtin_template

    if name in ("alpaca", "plain"):
        return builtin_template(name)
    config = fixtures / "tokenizers" / "chat_templates" / f"{name}__tokenizer_config.json"
    return json.loads(config.read_text())["chat_template"]


# family: (model type, fixture tokenizer, control tokens added to it, training template,
#          config overrides). Gemma and Qwen2 have no tokenizer among the fixtures: Gemma gets
# Llama-2's SentencePiece vocabulary with Gemma's turn tokens, Qwen2 GPT-2's byte-level BPE
# with ChatML's, each with its own real chat template.
FAMILIES = {
    "llama-2": ("llama", "llama-2", [], "alpaca", {}),
    "mistral-v0.1": ("mistral", "mistral-v1", [], "alpaca", {}),
    "gemma": ("gemma", "llama-2", ["<start_of_turn>", "<end_of_turn>"], "gemma", GEMMA),
    "phi-3": ("phi3", "phi-3-mini", [], None, {}),
    "qwen2": ("qwen2", "gpt2", ["<|im_start|>", "<|im_end|>"], "qwen2.5", {}),
    "gpt2": ("gpt2", "gpt2", [], "alpaca", {"n_ctx": 1024}),
}

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "user", "content": "Write a haiku about a quiet pond,  in   autumn."},
        {"role": "assistant", "content": "Leaves drift on the pond."},
    ],
]


class Exported:
    """One family's merged folder, our file, the converter's file (or why there is none)."""

    def __init__(self, family: str, work: Path, fixtures: Path):
        from sft_pipeline.data.templating import Renderer
        from sft_pipeline.data.tokenization import encode_texts
        from sft_pipeline.model.stop_tokens import configure_special_tokens

        model_type, tokenizer_name, controls, template, overrides = FAMILIES[family]
        self.family = family
        tokenizer = tokenizer_for(tokenizer_name, fixtures, work, template=False)
        if controls:
            tokenizer.add_special_tokens({"additional_special_tokens": controls})
        if template:
            tokenizer.chat_template = _template(fixtures, template)
        if template == "qwen2.5":
            tokenizer.eos_token = "<|im_end|>"
        model = build_tiny_model(model_type, len(tokenizer), **overrides)
        configure_special_tokens(model, tokenizer)
        self.merged = work / "merged"
        model.save_pretrained(self.merged)
        tokenizer.save_pretrained(self.merged)

        # The rendered training prompts and the ids training used for them.
        renderer = Renderer(tokenizer, TemplateConfig(chat_template="tokenizer"))
        self.prompts = [renderer.row(c)["prompt"] for c in CONVERSATIONS]
        self.training_ids = encode_texts(tokenizer, self.prompts)[0]
        self.tokenizer = tokenizer

        export(self.merged, ExportConfig(gguf=["f16"], check=False)).save_pretrained(work / "ours")
        self.ours = work / "ours" / "model-f16.gguf"
        self.reference: Path | None = work / "reference.gguf"
        self.refusal: str | None = None
        try:
            gguf_reference.convert(self.merged, self.reference)
        except ExportError as exc:
            self.reference, self.refusal = None, str(exc)


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request, tmp_path_factory) -> Exported:
    fixtures = request.getfixturevalue("fixtures_dir")
    return Exported(request.param, tmp_path_factory.mktemp(request.param), fixtures)


def _tokens(path: Path, texts: list[str]) -> list[list[int]]:
    return llamacpp.probe(path, texts, [])["tokens"]


@functools.cache
def _reader(path: Path) -> gguf.GGUFReader:
    # Parsing a 50k-token vocabulary takes seconds: once per file.
    return gguf.GGUFReader(path)


def _tokenizer_keys(path: Path) -> dict:
    fields = _reader(path).fields
    return {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.ggml.")}


def test_llama_cpp_tokenizes_the_training_prompts_as_training_did(exported):
    """From our file, and from the converter's where it wrote one with the same scores."""
    files = [exported.ours]
    if exported.reference and SCORES not in DIFFERENT_ON_PURPOSE.get(exported.family, ()):
        files.append(exported.reference)
    for path in files:
        got = _tokens(path, exported.prompts)
        for prompt, ids, trained in zip(exported.prompts, got, exported.training_ids, strict=True):
            assert ids == trained, (
                f"{exported.family} ({path.name}): {prompt!r}\nllama.cpp {ids[:12]} "
                f"{exported.tokenizer.convert_ids_to_tokens(ids[:12])}\ntraining  {trained[:12]} "
                f"{exported.tokenizer.convert_ids_to_tokens(trained[:12])}"
            )


# What llama.cpp's converter cannot read in a folder transformers saved, per family: why our
# writer exports these families rather than the converter. (Qwen2's stand-in vocabulary is not
# among the tokenizers the converter knows by the hash of its encoding; a real Qwen2 one is.)
CONVERTER_REFUSES = {
    "gemma": "tokenizer.model",
    "phi-3": "tokenizer.model",
    "qwen2": "pre-tokenizer was not recognized",
}
# Keys where our file differs from the converter's on purpose, and why.
SCORES = "tokenizer.ggml.scores"  # the converter: -1000 for every token (see the test below)
DIFFERENT_ON_PURPOSE = {
    # add_sep_token false: the converter writes it from the post-processor, absent is false.
    "llama-2": {SCORES, "tokenizer.ggml.add_sep_token"},
    # This Mistral tokenizer adds no BOS, so training had none; the converter leaves the key out
    # and llama.cpp's SentencePiece default would add one.
    "mistral-v0.1": {SCORES, "tokenizer.ggml.add_bos_token"},
    # false written out; the converter leaves it out, false for GPT-2's pre-tokenizer in llama.cpp.
    "gpt2": {"tokenizer.ggml.add_bos_token"},
}


def test_tokenizer_metadata_equals_llama_cpps_converters(exported):
    if exported.family in CONVERTER_REFUSES:
        assert exported.reference is None
        assert CONVERTER_REFUSES[exported.family] in exported.refusal
        return
    assert exported.reference is not None, exported.refusal
    ours, reference = _tokenizer_keys(exported.ours), _tokenizer_keys(exported.reference)
    allowed = DIFFERENT_ON_PURPOSE.get(exported.family, set())
    differing = {
        key: (str(ours.get(key, "<absent>"))[:80], str(reference.get(key, "<absent>"))[:80])
        for key in set(ours) | set(reference)
        if key not in allowed and ours.get(key, "<absent>") != reference.get(key, "<absent>")
    }
    assert not differing, f"{exported.family}: ours vs llama.cpp's converter: {differing}"


def test_the_converters_flat_scores_make_llama_cpp_tokenize_unlike_training(exported):
    if SCORES not in DIFFERENT_ON_PURPOSE.get(exported.family, ()):
        pytest.skip(f"{exported.family}: our scores are the converter's")
    texts = [*exported.prompts, "Leaves drift on the quiet pond."]
    pond = exported.tokenizer(texts[-1], add_special_tokens=False)["input_ids"]
    trained = [*exported.training_ids, pond]
    assert _tokens(exported.ours, texts) == trained
    assert _tokens(exported.reference, texts) != trained


def test_tensors_equal_llama_cpps_converters_after_dequantization(exported, tmp_path):
    reference = exported.reference
    if reference is None:
        # The converter wants the SentencePiece model transformers no longer saves (or, for
        # Qwen2, a vocabulary it knows): give it Llama-2's; only the tensors are compared.
        folder = tmp_path / "merged"
        shutil.copytree(exported.merged, folder)
        shutil.copy(exported_fixture_tokenizer_model(), folder / "tokenizer.model")
        reference = gguf_reference.convert(folder, tmp_path / "reference.gguf")
    ours = {t.name: t for t in _reader(exported.ours).tensors}
    theirs = {t.name: t for t in _reader(reference).tensors}
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        mine = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        other = gguf.quants.dequantize(theirs[name].data, theirs[name].tensor_type)
        assert mine.shape == other.shape, name
        assert tensor.tensor_type == theirs[name].tensor_type, name
        np.testing.assert_allclose(mine, other, atol=1e-3, err_msg=name)


def exported_fixture_tokenizer_model() -> Path:
    from tests.conftest import FIXTURES

    return FIXTURES / "tokenizers" / "llama-2" / "tokenizer.model"
