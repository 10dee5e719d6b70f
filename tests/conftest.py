"""Shared test fixtures: a tiny self-made tokenizer and tiny random models of five families.

Nothing here downloads anything: the tokenizer is trained in-process on a few sentences, the
models are built from configs with hidden size 32-64, so a test runs in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # One BLAS thread per worker (and per process it starts): N workers share N cores instead
    # of oversubscribing them. Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Real third-party datasets and tokenizers; tests that need them skip where the folder is absent.
FIXTURES = Path(
    os.environ.get("SFT_PIPELINE_FIXTURES") or PROJECT_ROOT.parent / "shared" / "fixtures"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Convert the record to JSON: name Alice, age 31, city Paris.",
    '{"name": "Alice", "age": 31, "city": "Paris"}',
    "You are a helpful assistant. Answer briefly and correctly.",
    "Write a haiku about autumn leaves falling in the quiet wind.",
    "1 2 3 4 5 6 7 8 9 0 + - * / = ( ) [ ] { } : ; , . ! ? ' \" # \n",
    "system user assistant instruction input output response prompt",
]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES} (only on developer machines and CI)")
    return FIXTURES


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~400) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


FAMILIES = ("llama", "mistral", "gemma", "phi3", "qwen2")


# The language-model shape of every tiny test model (vision models' text part included).
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def build_tiny_model(family: str, vocab_size: int, seed: int = 0, **overrides):
    """A random causal LM of `family` with hidden size 32-64, for tests only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(
        vocab_size=vocab_size,
        **TINY_SHAPE,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # Some families default to a pad id past a tiny vocabulary (phi3: 32000).
        pad_token_id=0,
    )
    if family == "gemma":
        common["head_dim"] = 16
    common.update(overrides)
    config = AutoConfig.for_model(family, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_model(path: Path, family: str = "llama", **overrides) -> Path:
    """Save a tiny random model of `family` and the tiny tokenizer into `path`."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(family, len(tokenizer), **overrides)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path_factory):
    """Factory: a folder with a tiny random model of `family` and the tiny tokenizer."""

    def make(family: str = "llama", **overrides) -> Path:
        return save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family, **overrides)

    return make


# The files of the longest tests, in the order the two workers start them. xdist gives a worker
# its next file while it still has two tests to run, so: the first file builds the reproduced
# DVC project the others copy (tests/project_copy.py); the second worker meanwhile runs two
# files that need no project (one minute, then about one), and only then one that copies it.
START_FIRST = (
    "repro/test_dvc.py",
    "finetune/test_process_tree.py",
    "pipeline/test_pipeline_benchmarks.py",
    "repro/test_dvc_experiments.py",
    "repro/test_dvc_remotes.py",
)


def pytest_configure(config):
    # `--dist loadfile` hands out files in collection order (below), not xdist's default of the
    # files with the most tests first, which started the one-test minute-long files last.
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """START_FIRST, then the other files with one of the longest tests (`long`), then those
    with the most end-to-end (`slow`) tests, each file whole and in its own order: the workers
    of `pytest -n 2 --dist loadfile` take files in this order, so the long ones start early and
    the short ones fill in at the end instead of one worker finishing alone."""
    from collections import Counter

    tests_dir = Path(__file__).parent
    first = {tests_dir / name: rank for rank, name in enumerate(START_FIRST)}
    long = {item.path for item in items if item.get_closest_marker("long")}
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(
        key=lambda item: (
            first.get(item.path, len(first)),
            item.path not in long,
            -slow[item.path],
        )
    )
