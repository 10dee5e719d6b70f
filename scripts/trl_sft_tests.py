"""Run TRL's own SFT trainer tests offline, once against TRL and once against our trainer.

    .venv/bin/python scripts/trl_sft_tests.py --trl-repo PATH [--ref REF] [--workdir DIR]

PATH is a git checkout of TRL (its tests are not part of this project and never copied into it).
The script copies from REF, into DIR (outside the project): `tests/test_sft_trainer.py`,
`tests/testing_utils.py`, `tests/data/template.jinja` and TRL's dataset scripts
(`scripts/generate_zen_dataset.py`, `generate_toolcall_dataset.py`). Then, with no network:

- the Hub ids the tests load are stand-ins in a local hub cache: tiny random Qwen2, Qwen3 and
  GPT-NeoX models (TRL's tiny shapes: hidden 8, 2 layers) built from configs, with GPT-2's BPE
  vocabulary plus Qwen's added tokens and the real Qwen2.5/Qwen3 chat templates from the shared
  fixtures (`tokenizers/chat_templates`);
- the `zen` and `toolcall` datasets are made by TRL's own scripts, their upload written as
  parquet files that `load_dataset("trl-internal-testing/...")` reads;
- a conftest makes TRL run on a CPU (fp32 where its configs default to bf16) and, with
  `SFT_IMPL=ours`, replaces only `trl.SFTTrainer` and `trl.SFTConfig` with ours.

It runs the `TestSFTTrainer` tests twice (junit XML in DIR) and prints how many pass against
TRL, how many of those pass against ours, and each that does not.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("SFT_PIPELINE_FIXTURES") or ROOT.parent / "shared" / "fixtures")
FROM_TRL = {
    "tests/test_sft_trainer.py": "tests/test_sft_trainer.py",
    "tests/testing_utils.py": "tests/testing_utils.py",
    "tests/data/template.jinja": "shared_data/template.jinja",
    "scripts/generate_zen_dataset.py": "generate_zen_dataset.py",
    "scripts/generate_toolcall_dataset.py": "generate_toolcall_dataset.py",
}
# (Hub id, model family, tokenizer config in chat_templates/ or None for a base model)
MODELS = [
    ("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5", "qwen2", "qwen2.5__tokenizer_config.json"),
    ("trl-internal-testing/tiny-Qwen3ForCausalLM", "qwen3", "qwen3__tokenizer_config.json"),
    ("trl-internal-testing/tiny-GPTNeoXForCausalLM", "gpt_neox", None),
]
SNAPSHOT = "0" * 40

CONFTEST = '''"""TRL's SFT tests offline; SFT_IMPL=ours swaps in our SFTTrainer and SFTConfig."""
import importlib
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(HERE / "hf_cache"))

import datasets  # noqa: E402
import torch  # noqa: E402
import trl  # noqa: E402

# Names a newer test file imports from TRL: placeholders (tests using them fail on both sides).
import_utils = importlib.import_module("trl.import_utils")
for name in ("is_joblib_available", "is_harbor_available", "is_openreward_available",
             "is_mergekit_available", "is_math_verify_available", "is_jmespath_available"):
    if not hasattr(import_utils, name):
        setattr(import_utils, name, lambda: False)
trl_sft = importlib.import_module("trl.trainer.sft_trainer")
for name in ("dft_loss", "_chunked_cross_entropy_loss", "_patch_chunked_ce_lm_head"):
    if not hasattr(trl_sft, name):
        def missing(*_a, _name=name, **_k):
            raise NotImplementedError(f"{_name} is not in the installed TRL")
        setattr(trl_sft, name, missing)

_load_dataset = datasets.load_dataset


def load_dataset(path, name=None, *args, **kwargs):
    local = HERE / "data" / path.removeprefix("trl-internal-testing/")
    if path.startswith("trl-internal-testing/") and local.is_dir():
        files = {p.stem: str(p) for p in (local / name).glob("*.parquet")}
        return _load_dataset("parquet", data_files=files, **kwargs)
    return _load_dataset(path, name, *args, **kwargs)


datasets.load_dataset = load_dataset

# TRL's configs default to bf16, which transformers refuses on a CPU: fp32 there.
base_config = importlib.import_module("trl.trainer.base_config")
_post_init = base_config._BaseConfig.__post_init__


def _post_init_cpu(self):
    if self.bf16 is None and not torch.cuda.is_available():
        self.bf16 = False
    _post_init(self)


base_config._BaseConfig.__post_init__ = _post_init_cpu

if os.environ.get("SFT_IMPL") == "ours":
    from sft_pipeline.trainer import SFTConfig, SFTTrainer

    trl.SFTConfig, trl.SFTTrainer = SFTConfig, SFTTrainer


@pytest.fixture
def lazy_shared_datadir():
    return HERE / "shared_data"
'''


def copy_from_trl(repo: Path, ref: str, workdir: Path) -> None:
    for source, target in FROM_TRL.items():
        text = subprocess.run(
            ["git", "-C", str(repo), "show", f"{ref}:{source}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (workdir / target).parent.mkdir(parents=True, exist_ok=True)
        (workdir / target).write_text(text, encoding="utf-8")
    (workdir / "tests" / "__init__.py").write_text("", encoding="utf-8")
    (workdir / "tests" / "conftest.py").write_text(CONFTEST, encoding="utf-8")


def tokenizer_for(config_name: str | None):
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizers" / "gpt2"))
    if config_name is None:
        return tokenizer
    config = json.loads((FIXTURES / "tokenizers" / "chat_templates" / config_name).read_text())
    added = sorted(config["added_tokens_decoder"].items(), key=lambda item: int(item[0]))
    # GPT-2's own <|endoftext|> stands for Qwen's token of the same text.
    specials = [t["content"] for _, t in added if t["special"] and t["content"] != "<|endoftext|>"]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, normalized=False) for t in specials]}
    )
    tokenizer.add_tokens(
        [AddedToken(t["content"], normalized=False) for _, t in added if not t["special"]]
    )
    tokenizer.eos_token, tokenizer.pad_token = config["eos_token"], config["pad_token"]
    tokenizer.bos_token = tokenizer.unk_token = None  # Qwen has neither
    tokenizer.chat_template = config["chat_template"]
    return tokenizer


def build_models(workdir: Path) -> None:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    for repo_id, family, config_name in MODELS:
        tokenizer = tokenizer_for(config_name)
        shape = dict(hidden_size=8, num_attention_heads=4, num_hidden_layers=2)
        if family != "gpt_neox":
            shape["num_key_value_heads"] = 2
        config = AutoConfig.for_model(
            family,
            vocab_size=len(tokenizer),
            intermediate_size=32,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **shape,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, 0.02)
        org, name = repo_id.split("/")
        root = workdir / "hf_cache" / f"models--{org}--{name}"
        shutil.rmtree(root, ignore_errors=True)
        snapshot = root / "snapshots" / SNAPSHOT
        snapshot.mkdir(parents=True)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text(SNAPSHOT)
        model.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(snapshot)


def build_datasets(workdir: Path) -> None:
    import datasets

    for name in ("zen", "toolcall"):
        out = workdir / "data" / name

        def to_parquet(self, _repo_id, config_name, _out=out, **_kwargs):
            for split, part in self.items():
                (_out / config_name).mkdir(parents=True, exist_ok=True)
                part.to_parquet(str(_out / config_name / f"{split}.parquet"))

        datasets.DatasetDict.push_to_hub = to_parquet
        sys.argv = [f"generate_{name}_dataset.py", "--push_to_hub", "true"]
        runpy.run_path(str(workdir / f"generate_{name}_dataset.py"), run_name="__main__")


def run_tests(workdir: Path, impl: str) -> Path:
    report = workdir / f"{impl}.xml"
    env = {**os.environ, "SFT_IMPL": impl}
    subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_sft_trainer.py", "-k",
         "TestSFTTrainer and not Slow", "-p", "no:cacheprovider", "-q",
         f"--junitxml={report}"],
        cwd=workdir,
        env=env,
        check=False,
    )  # fmt: skip
    return report


def outcomes(report: Path) -> dict[str, tuple[str, str]]:
    result = {}
    for case in ET.parse(report).iter("testcase"):
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                status, message = tag, (element.get("message") or "").replace("\n", " ")
        result[case.get("name")] = (status, message[:160])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trl-repo", type=Path, required=True, help="a git checkout of TRL")
    parser.add_argument("--ref", default="HEAD", help="the TRL commit or tag to take tests from")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trl_sft_tests"))
    args = parser.parse_args()
    if not FIXTURES.is_dir():
        sys.exit(f"shared fixtures not found at {FIXTURES} (set SFT_PIPELINE_FIXTURES)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    copy_from_trl(args.trl_repo, args.ref, args.workdir)
    build_models(args.workdir)
    build_datasets(args.workdir)
    theirs = outcomes(run_tests(args.workdir, "trl"))
    ours = outcomes(run_tests(args.workdir, "ours"))
    passing = [name for name, (status, _) in theirs.items() if status == "passed"]
    both = [name for name in passing if ours.get(name, ("missing",))[0] == "passed"]
    print(f"TestSFTTrainer: {len(passing)} of {len(theirs)} pass against TRL")
    print(
        f"of those, {len(both)} pass against ours ({100 * len(both) / max(len(passing), 1):.1f}%)"
    )
    for name in passing:
        if name not in both:
            print(f"  not with ours: {name}: {ours.get(name, ('missing', ''))[1]}")


if __name__ == "__main__":
    main()
