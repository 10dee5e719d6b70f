"""More model families through the real `sft` pipeline (`kedro run`), with parameters only.

Each family is a tiny random model saved with a real tokenizer from the shared fixtures; the run
fine-tunes it (LoRA, a few steps) and merges: the merged model's logits must equal the base
model's with the adapter applied. Evaluation and the report are left to the other end-to-end
tests, the GGUF export of each family to tests/export/test_gguf_llamacpp.py (llama.cpp itself on
the same families). Base-model tokenizers (no chat template) go through
`template.chat_template: auto`'s plain layout, which the merged tokenizer then carries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests import project_copy as pc

pytestmark = pytest.mark.slow

# family -> (tokenizer fixture, chat template fixture or None, special tokens it needs, config)
FAMILIES = {
    # PhiForCausalLM: partial rotary embeddings, dense + fc1/fc2 (no gated MLP), biases.
    "phi": ("phi-2", None, [], {}),
    # GPT-2: Conv1D layers (LoRA with fan_in_fan_out), learned positions.
    "gpt2": ("gpt2", None, [], {"n_inner": 128}),
    # Gemma-2: attention and final-logit soft-capping, sliding-window layers.
    "gemma2": (
        "llama-2",
        "gemma__tokenizer_config.json",
        ["<start_of_turn>", "<end_of_turn>"],
        # As every real Gemma-2 (llama.cpp requires both): tied input and output embeddings, and
        # attention scaled by the head size.
        {"head_dim": 16, "tie_word_embeddings": True, "query_pre_attn_scalar": 16},
    ),
    # Qwen3: q/k norms.
    "qwen3": (
        "gpt2",
        "qwen2.5__tokenizer_config.json",
        ["<|im_start|>", "<|im_end|>"],
        {"head_dim": 16},
    ),
    # GPT-NeoX: fused query_key_value, parallel residual.
    "gpt_neox": ("phi-2", None, [], {}),
    # SentencePiece vocabularies: Llama-2 (base, plain layout), Mistral v3 (its [INST] control
    # tokens), and Phi-3 with its own chat template.
    "llama": ("llama-2", None, [], {}),
    "mistral": ("mistral-v3", None, [], {}),
    "phi3": ("phi-3-mini", None, [], {}),
}
RUN_PARAMS = {
    "data": {"eval_fraction": 0.25},
    "training": {"max_steps": 2, "learning_rate": 5e-3},
}


def save_family_model(path: Path, family: str, fixtures: Path) -> Path:
    from tests.conftest import build_tiny_model
    from tests.export.test_gguf_llamacpp import tokenizer_for

    tokenizer_name, template_file, specials, config = FAMILIES[family]
    tokenizer = tokenizer_for(tokenizer_name, fixtures, path.parent, template=False)
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if template_file:
        source = fixtures / "tokenizers" / "chat_templates" / template_file
        tokenizer.chat_template = json.loads(source.read_text())["chat_template"]
    model = build_tiny_model(family, len(tokenizer), initializer_range=0.2, **config)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "family",
    sorted(FAMILIES),
)
def test_family_fine_tunes_through_the_pipeline_and_merges_exactly(
    family, tmp_path, fixtures_dir, monkeypatch
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_pipeline.model.loading import load_model

    model_dir = save_family_model(tmp_path / "model", family, fixtures_dir)
    project = pc.make_project(tmp_path / "project", records=12, model_dir=model_dir)
    pc.set_params(project, RUN_PARAMS)
    kedro = [sys.executable, "-m", "kedro", "run", "--pipeline=sft", "--env", pc.TINY_ENV]
    pc.run([*kedro, "--to-nodes=merge_adapter"], project)  # the nodes these tests check

    monkeypatch.chdir(project)  # the base manifest names the model folder relative to it
    models = project / "data" / "06_models"
    manifest = json.loads((models / "base" / "manifest.json").read_text())
    assert (
        manifest["architecture"] == type(AutoModelForCausalLM.from_pretrained(model_dir)).__name__
    )
    history = json.loads((project / "data/08_reporting/training_history.json").read_text())
    assert [row["loss"] for row in history if row.get("loss") is not None]

    ids = torch.tensor([[3, 40, 41, 120, 7, 9, 250, 33]])
    with torch.inference_mode():
        base = load_model(models / "base", dtype=torch.float32).eval()
        plain = base(ids).logits
        expected = PeftModel.from_pretrained(base, models / "adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(models / "merged").eval()(ids).logits
    assert (expected - plain).abs().max() > 0  # training moved the adapter off zero
    # A base whose only special token is its EOS (GPT-2, Phi-2) gets a pad token at the merge:
    # one more vocabulary row, which no original logit depends on.
    vocab = expected.shape[-1]
    assert merged.shape[-1] - vocab in (0, 1)
    assert (merged[..., :vocab] - expected).abs().max().item() < 1e-4

    tokenizer = AutoTokenizer.from_pretrained(models / "merged")
    card = (models / "merged" / "README.md").read_text()
    if not AutoTokenizer.from_pretrained(model_dir).chat_template:
        # A base tokenizer: trained and merged with the plain layout.
        assert "eos_token" in tokenizer.chat_template
        assert "## Prompt format" in card and "'plain'" in card
    else:
        assert "## Prompt format" not in card  # its own template, unchanged
