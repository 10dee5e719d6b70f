"""One epoch of a tiny LLaVA-style model on image rows: ours against TRL's `SFTTrainer` and a naive
`transformers.Trainer` (the processor applied to each batch in the collator, labels = input ids
without padding and image tokens, as the usual fine-tuning recipes write it).

All three get the same rows (the three JPEGs of LLaMA-Factory's `mllm_demo` with short
questions and answers, in TRL's vision format), LoRA settings, batch size and seed. Ours
reads the stored image bytes, hashes them and processes every image once, ahead of training (its
`prepare_dataset`); TRL's collator and the naive one decode and process the images of each batch
at every step. Each trainer runs in its own process (peak RSS from getrusage of that
process alone); tokens/s counts non-padding tokens over the epoch's wall time, preparation
included. `--json` writes the numbers.

    .venv/bin/python benchmarks/vision_sft.py                 # 256 rows (the real measurement)
    .venv/bin/python benchmarks/vision_sft.py --rows 8        # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = Path(os.environ.get("SFT_PIPELINE_FIXTURES") or ROOT.parent / "shared" / "fixtures")
IMAGES = FIXTURES / "datasets" / "llamafactory" / "mllm_demo_data"


# The training settings all three share.
SETTINGS = dict(
    num_train_epochs=1,
    per_device_train_batch_size=4,
    learning_rate=1e-3,
    report_to="none",
    save_strategy="no",
    use_cpu=True,
    seed=0,
)


def write_result(out: str, tokens: int, seconds: float) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"tokens": tokens, "seconds": seconds, "peak_rss_mib": peak}))


def rows(n: int):
    from PIL import Image

    pictures = [Image.open(IMAGES / f"{k}.jpg").convert("RGB") for k in (1, 2, 3)]
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": f"Question {k}?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": f"Answer {k % 7}."}]},
            ],
            "images": [pictures[k % 3]],
        }
        for k in range(n)
    ]


def run_one(which: str, model_dir: str, n: int, out: str) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if which == "trainer":
        run_naive(model_dir, n, out)
        return
    if which == "ours":
        from sft_pipeline.trainer import SFTConfig, SFTTrainer
    else:
        from trl import SFTConfig, SFTTrainer
    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    args = SFTConfig(**SETTINGS, output_dir=tempfile.mkdtemp(), packing=False, max_length=None)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows(n)),
        processing_class=processor,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    tokens = [0]
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        tokens[0] += int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting
    trainer.train()
    write_result(out, tokens[0], time.perf_counter() - start)


def run_naive(model_dir: str, n: int, out: str) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        Trainer,
        TrainingArguments,
    )

    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    tokens = [0]

    def collate(examples):
        texts = [processor.apply_chat_template(e["messages"], tokenize=False) for e in examples]
        images = [e["images"] for e in examples]
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        labels[labels == image_token] = -100
        batch["labels"] = labels
        tokens[0] += int(batch["attention_mask"].sum())
        return batch

    args = TrainingArguments(**SETTINGS, output_dir=tempfile.mkdtemp(), remove_unused_columns=False)
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows(n)), data_collator=collate
    )
    trainer.train()
    write_result(out, tokens[0], time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        which, model_dir, n, out = args.one
        run_one(which, model_dir, int(n), out)
        return
    from tests.vision_models import save_vision_model

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_vision_model(Path(tmp) / "llava", "llava", FIXTURES)
        for which in ("ours", "trl", "trainer"):
            out = Path(tmp) / f"{which}.json"
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    which,
                    str(model_dir),
                    str(args.rows),
                    str(out),
                ],
                check=True,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            )
            results[which] = json.loads(out.read_text())
    for which, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        print(
            f"{which:7s} {r['tokens']:7d} tokens {r['seconds']:7.1f} s "
            f"{r['tokens_per_s']:8.1f} tokens/s  peak RSS {r['peak_rss_mib']:.0f} MiB"
        )
    ours = results["ours"]["tokens_per_s"]
    ratios = {
        "ours/trl": ours / results["trl"]["tokens_per_s"],
        "ours/trainer": ours / results["trainer"]["tokens_per_s"],
    }
    for name, ratio in ratios.items():
        print(f"{name} tokens/s: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({**results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
