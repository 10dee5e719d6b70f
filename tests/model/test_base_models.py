"""Base models (no chat template) work out of the box, with exact labels on real tokenizers.

Prompt/completion strings are joined as prompt + completion + EOS (BOS first when the model uses
one), exactly the ids `tokenizer(prompt + completion + eos)` gives; conversations fall back to
the plain layout under `template.chat_template: auto`. The seed's example runs on a tiny random
Llama saved with the real Llama-2 tokenizer, and packing keeps that setup's sequences apart.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from sft_pipeline.common.config import TemplateConfig, TokenizationConfig
from sft_pipeline.data.templating import render_prompt_completion, trained_template
from sft_pipeline.data.tokenization import tokenize_texts
from tests.data.rows import render_messages
from tests.data.test_tokenization import supervised_runs

BASE_TOKENIZERS = ("llama-2", "gpt2", "phi-2")
PAIRS = [
    ("What is the capital of France?", " Paris."),
    ("Question: 2+2=?\nAnswer:", " 4"),
    ("Translate to German: good morning\n\n", "Guten Morgen"),
    ("Name a colour. ", "Blue, for example."),
]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": " Paris."},
    {"role": "user", "content": "\nAnd of Spain?"},
    {"role": "assistant", "content": " Madrid."},
]


def _tokenizer(fixtures_dir: Path, name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(fixtures_dir / "tokenizers" / name))
    assert not tokenizer.chat_template  # these are base-model tokenizers
    return tokenizer


def _tokenize(row: dict, tokenizer) -> dict:
    dataset, rejected = tokenize_texts(
        [{"record_id": "r", **row}], tokenizer, TokenizationConfig(max_seq_length=512)
    )
    assert rejected == []
    return dataset[0]


@pytest.mark.parametrize("name", BASE_TOKENIZERS)
def test_prompt_completion_strings_train_the_prompt_ids_inference_sees_with_exact_labels(
    fixtures_dir, name
):
    tokenizer = _tokenizer(fixtures_dir, name)
    eos = tokenizer.eos_token
    for prompt, completion in PAIRS:
        example = _tokenize(render_prompt_completion(prompt, completion, tokenizer), tokenizer)
        # The prompt as the model's own tokenizer encodes it alone (BOS included where used), as
        # at inference, then the completion: "Name a colour. " ends in its own space token, where
        # encoding the joined text would merge it into the completion's first word.
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert example["input_ids"][: len(prompt_ids)] == prompt_ids
        assert tokenizer.decode(example["input_ids"]) == tokenizer.decode(
            tokenizer(prompt + completion + eos)["input_ids"]
        )
        runs, unsupervised = supervised_runs(example)
        assert len(runs) == 1
        assert tokenizer.decode(runs[0]).strip() == (completion + eos).strip()
        assert tokenizer.decode(unsupervised, skip_special_tokens=True).strip() == prompt.strip()


@pytest.mark.parametrize("name", BASE_TOKENIZERS)
def test_conversations_without_a_template_use_the_logged_plain_layout(fixtures_dir, name, caplog):
    tokenizer = _tokenizer(fixtures_dir, name)
    eos = tokenizer.eos_token
    with caplog.at_level(logging.WARNING, logger="sft_pipeline.data.templating"):
        row = render_messages(CONVERSATION, tokenizer, TemplateConfig())
    assert "built-in template 'plain'" in caplog.text and "no chat template" in caplog.text
    text = "".join(s["text"] for s in row["segments"])
    bos = tokenizer.bos_token if name == "llama-2" else ""
    assert text == (
        f"{bos}Answer briefly.\n\nWhat is the capital of France? Paris.{eos}\nAnd of Spain? "
        f"Madrid.{eos}"
    )
    runs, unsupervised = supervised_runs(_tokenize(row, tokenizer))
    assert [tokenizer.decode(r).strip() for r in runs] == [f"Paris.{eos}", f"Madrid.{eos}"]
    prompt_text = tokenizer.decode(unsupervised)
    assert "Answer briefly." in prompt_text and "And of Spain?" in prompt_text


def test_one_turn_conversation_renders_exactly_as_prompt_completion(fixtures_dir):
    tokenizer = _tokenizer(fixtures_dir, "llama-2")
    prompt, completion = PAIRS[0]
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    conversation = render_messages(messages, tokenizer, TemplateConfig())
    assert (
        conversation["segments"]
        == render_prompt_completion(prompt, completion, tokenizer)["segments"]
    )


def test_auto_keeps_a_tokenizer_template_and_names_the_fallback(tiny_tokenizer, fixtures_dir):
    assert trained_template(tiny_tokenizer, TemplateConfig()) is None  # its own: nothing to set
    source, name = trained_template(_tokenizer(fixtures_dir, "gpt2"), TemplateConfig())
    assert "'plain'" in name and "eos_token" in source


# --- the seed's example on a base model --------------------------------------------------------

# The seed's data (as in test_trainer_seed.py): the response follows the prompt directly.
SEED_PAIRS = [
    {"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(12)
]


def save_llama2_base(path: Path, fixtures_dir: Path) -> Path:
    """A tiny random Llama saved with the real Llama-2 tokenizer (BOS, no pad, no template)."""
    from tests.conftest import build_tiny_model

    tokenizer = _tokenizer(fixtures_dir, "llama-2")
    model = build_tiny_model("llama", len(tokenizer), pad_token_id=None)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama2_base(tmp_path_factory, fixtures_dir) -> Path:
    return save_llama2_base(tmp_path_factory.mktemp("llama2-base"), fixtures_dir)


@pytest.mark.parametrize("use_peft", [False, True])
def test_seed_example_on_a_llama2_base_model(tmp_path, llama2_base, use_peft):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from sft_pipeline import SFTTrainer

    # The seed's script, with the import and the model path changed.
    model = AutoModelForCausalLM.from_pretrained(llama2_base)
    tokenizer = AutoTokenizer.from_pretrained(llama2_base)
    extra = {}
    if use_peft:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=Dataset.from_list(SEED_PAIRS),
        dataset_text_field="prompt",
        max_seq_length=512,
        args=TrainingArguments(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            learning_rate=2e-3,
            fp16=True,  # the seed's setting; on a CPU it falls back to fp32 with a warning
            report_to="none",
            max_steps=3,
            logging_steps=1,
        ),
        **extra,
    )
    for pair, row in zip(SEED_PAIRS, trainer.train_dataset, strict=True):
        text = pair["prompt"] + pair["response"] + tokenizer.eos_token
        assert row["input_ids"] == tokenizer(text)["input_ids"]
        supervised = [t for t in row["labels"] if t != -100]
        # The response and its EOS, and never the prompt (nor the BOS).
        assert tokenizer.decode(supervised) == pair["response"] + "</s>"
        assert supervised[-1] == tokenizer.eos_token_id
        first = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert (
            tokenizer.decode(row["input_ids"][:first], skip_special_tokens=True) == (pair["prompt"])
        )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[-1] < losses[0]
    trainer.save_model(str(tmp_path / "saved"))
    saved = {p.name for p in (tmp_path / "saved").iterdir()}
    assert ("adapter_config.json" in saved) if use_peft else ("model.safetensors" in saved)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_base_model_rows_do_not_see_each_other(tmp_path, llama2_base, attn):
    """Packed and unpacked, the same rows give the same first-step loss: no packed sequence
    attends to (or is predicted from) another one."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_pipeline.trainer import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(llama2_base)
    model = AutoModelForCausalLM.from_pretrained(
        llama2_base, attn_implementation=attn, dtype=torch.float32
    ).eval()
    losses = {}
    for packing in (False, True):
        trainer = SFTTrainer(
            model=model,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list(SEED_PAIRS),
            args=SFTConfig(
                output_dir=str(tmp_path / str(packing)),
                report_to="none",
                max_length=64,
                packing=packing,
                use_cpu=True,
            ),
        )
        rows = list(trainer.train_dataset)
        if packing:
            assert len(rows) < len(SEED_PAIRS)
        batch = trainer.data_collator(rows)  # every row in one step
        with torch.no_grad():
            losses[packing] = trainer.compute_loss(model, batch).item()
    assert abs(losses[True] - losses[False]) < 1e-5, losses
