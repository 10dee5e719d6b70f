"""merge(): exact LoRA merge into a full-precision base, standalone folder, EOS/pad, model card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sft_pipeline.common.config import DataConfig, ModelConfig, QuantizationConfig
from sft_pipeline.export.merge import merge
from sft_pipeline.model.base_model import prepare_base_model
from sft_pipeline.model.loading import load_model

IDS = torch.tensor([[3, 40, 41, 120, 7, 9, 250, 33]])
SUMMARY = {"train_loss": 1.25, "eval_loss": 1.5, "lora": {"r": 4}, "steps": 10}


def force_next_token(model, token_id: int) -> None:
    """Make `token_id` the argmax at every position: a constant residual component read by it."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 50.0
        head = model.get_output_embeddings().weight
        head[:, 0] = 0.0
        head[token_id, 0] = 10.0


def make_base(src: Path, out: Path) -> Path:
    prepare_base_model(ModelConfig(name_or_path=str(src))).save_pretrained(out)
    return out


def make_lora_adapter(base_dir: Path, out: Path, tokenizer_dir: Path) -> Path:
    """A LoRA adapter with nonzero B (so it changes the logits), saved with the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    torch.manual_seed(1)
    base = load_model(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def peft_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    """Reference: the unmerged PEFT model on the fp32 base."""
    from peft import PeftModel

    base = load_model(base_dir, dtype=torch.float32)
    with torch.inference_mode():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(IDS).logits


def eos_ids_of(generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


@pytest.fixture
def lora_setup(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    base_dir = make_base(src, tmp_path / "base")
    adapter_dir = make_lora_adapter(base_dir, tmp_path / "adapter", src)
    return src, base_dir, adapter_dir


def test_merged_logits_equal_base_plus_adapter(lora_setup, tmp_path):
    from transformers import AutoModelForCausalLM

    _, base_dir, adapter_dir = lora_setup
    merge(base_dir, adapter_dir, DataConfig(), SUMMARY).save_pretrained(tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.dtype == torch.float32
    with torch.inference_mode():
        got = merged(IDS).logits
        plain = load_model(base_dir, dtype=torch.float32)(IDS).logits
    expected = peft_logits(base_dir, adapter_dir)
    assert (expected - plain).abs().max() > 1e-2  # the adapter really changes the model
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_merged_folder_is_standalone_with_card_and_special_tokens(lora_setup, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    _, base_dir, adapter_dir = lora_setup
    out = tmp_path / "merged"
    merge(base_dir, adapter_dir, DataConfig(), SUMMARY).save_pretrained(out)

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(name.startswith("adapter_") for name in files)
    tokenizer = AutoTokenizer.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    eos = eos_ids_of(gen)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert gen.pad_token_id not in eos
    assert tokenizer.pad_token_id == gen.pad_token_id
    assert tokenizer.chat_template
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model:" in front and "library_name: transformers" in front
    assert "- sft-pipeline" in front and "- lora" in front
    assert "train_loss: 1.25" in card and "eval_loss: 1.5" in card
    assert "data/01_raw/demo_sft.jsonl" in card and "AutoModelForCausalLM" in card


def test_merge_is_deterministic(lora_setup, tmp_path):
    _, base_dir, adapter_dir = lora_setup
    for name in ("a", "b"):
        merge(base_dir, adapter_dir, DataConfig(), SUMMARY).save_pretrained(tmp_path / name)
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


def _greedy_new_tokens(folder: Path, max_new_tokens: int = 12) -> tuple[list[int], list[int]]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.inference_mode():
        out = model.generate(IDS, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, IDS.shape[1] :].tolist(), eos_ids_of(GenerationConfig.from_pretrained(folder))


def test_greedy_generation_stops_at_eos(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(src)
    force_next_token(model, AutoTokenizer.from_pretrained(src).eos_token_id)
    model.save_pretrained(src)
    base_dir = make_base(src, tmp_path / "base")
    adapter_dir = make_lora_adapter(base_dir, tmp_path / "adapter", src)
    merge(base_dir, adapter_dir, DataConfig(), SUMMARY).save_pretrained(tmp_path / "merged")

    new, eos = _greedy_new_tokens(tmp_path / "merged")
    assert len(new) < 12 and new[-1] in eos


def test_end_of_turn_token_stops_and_pad_is_added_when_all_specials_are_eos(
    tiny_model_dir, tmp_path
):
    """A base whose EOS is <|endoftext|> but whose chat turns end with <|im_end|>.

    Every special token but BOS is then an end token, so the merge must add a pad token (and
    grow the embeddings), and generation must stop at <|im_end|> as well.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    force_next_token(model, end_of_turn)
    model.save_pretrained(src)
    vocab = len(tokenizer)
    base_dir = make_base(src, tmp_path / "base")
    adapter_dir = make_lora_adapter(base_dir, tmp_path / "adapter", src)
    out = tmp_path / "merged"
    merge(base_dir, adapter_dir, DataConfig(), SUMMARY).save_pretrained(out)

    new, eos = _greedy_new_tokens(out)
    assert set(eos) == {tokenizer.eos_token_id, end_of_turn}
    assert new == [end_of_turn]
    merged_tokenizer = AutoTokenizer.from_pretrained(out)
    assert merged_tokenizer.pad_token == "<|pad|>" and len(merged_tokenizer) == vocab + 1
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == vocab + 1


def test_adapter_trained_on_4bit_base_merges_into_full_precision(lora_setup, tmp_path):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    _, base_dir, _ = lora_setup
    quant = QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype="float32")
    model = prepare_model_for_kbit_training(
        load_model(base_dir, quantization=quant), use_gradient_checkpointing=False
    )
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # An eval forward repacks 4-bit weights in place on avx512_bf16 CPUs: merging into that
    # model would be corrupted; the merge must not depend on it.
    model.eval()
    with torch.inference_mode():
        model(IDS)
    adapter_dir = tmp_path / "qlora-adapter"
    model.save_pretrained(adapter_dir)
    summary = {"method": "qlora", "train_loss": 2.0, "train_runtime_s": 1.234}
    merged = merge(base_dir, adapter_dir, DataConfig(), summary)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())
    assert all(p.dtype == torch.float32 for p in reloaded.parameters())
    with torch.inference_mode():
        got = reloaded(IDS).logits
    assert torch.allclose(got, peft_logits(base_dir, adapter_dir), atol=1e-4, rtol=0)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "- qlora" in card and "runtime" not in card


def test_full_fine_tune_passes_through(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir("qwen2")
    base_dir = make_base(src, tmp_path / "base")
    tuned = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        tuned.get_output_embeddings().weight.mul_(1.5)
    tuned.save_pretrained(tmp_path / "full")
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / "full")
    merge(base_dir, tmp_path / "full", DataConfig(), {}).save_pretrained(tmp_path / "merged")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for name, value in tuned.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    assert "- full-fine-tuning" in (tmp_path / "merged" / "README.md").read_text()


def test_unknown_adapter_folder_is_refused(lora_setup, tmp_path):
    _, base_dir, _ = lora_setup
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected a PEFT adapter"):
        merge(base_dir, tmp_path / "empty", DataConfig(), {})


def test_real_phi3_tokenizer_end_of_turn_and_pad(fixtures_dir):
    """Phi-3 ends turns with <|end|>, not its EOS <|endoftext|>, which is also its pad token."""
    from transformers import AutoTokenizer

    from sft_pipeline.model.stop_tokens import choose_pad_token_id, end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(fixtures_dir / "tokenizers" / "phi-3-mini")
    eos = end_of_turn_ids(tokenizer)
    assert set(tokenizer.convert_ids_to_tokens(eos)) == {"<|endoftext|>", "<|end|>"}
    pad = choose_pad_token_id(tokenizer, eos)
    assert pad not in eos and tokenizer.convert_ids_to_tokens(pad) == "<unk>"


def test_a_token_the_chat_template_writes_is_never_the_pad(fixtures_dir):
    """GPT-2's vocabulary with ChatML turns: <|im_start|> is special and not an EOS, but every
    prompt holds it, and a consumer masking pad ids would hide each turn's opening; with no
    other special token left, a pad token is added instead."""
    import json

    from transformers import AutoTokenizer

    from sft_pipeline.model.stop_tokens import choose_pad_token_id, end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(fixtures_dir / "tokenizers" / "gpt2")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    template = fixtures_dir / "tokenizers" / "chat_templates" / "qwen2.5__tokenizer_config.json"
    tokenizer.chat_template = json.loads(template.read_text())["chat_template"]
    eos = end_of_turn_ids(tokenizer)
    assert choose_pad_token_id(tokenizer, eos) is None
    tokenizer.chat_template = None  # a template that never writes <|im_start|>: it may pad
    assert tokenizer.convert_ids_to_tokens(choose_pad_token_id(tokenizer, eos)) == "<|im_start|>"


def test_merged_tokenizer_carries_the_training_template(lora_setup, tmp_path):
    """A base model trained with template.chat_template=alpaca answers in that format after
    the merge: its tokenizer renders a chat the way the training data was rendered."""
    from transformers import AutoTokenizer

    from sft_pipeline.common.config import TemplateConfig

    _, base_dir, adapter_dir = lora_setup
    cfg = TemplateConfig(chat_template="alpaca", system_prompt="Answer briefly.")
    out = tmp_path / "merged"
    merge(base_dir, adapter_dir, DataConfig(), SUMMARY, cfg).save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a colour."},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "### Instruction:" in prompt and prompt.rstrip().endswith("### Response:")
    assert "Answer briefly." in (out / "README.md").read_text()
