"""One epoch of a tiny LLaVA-style model on image rows: ours against TRL's `SFTTrainer`.

Both trainers get the same rows (the three JPEGs of LLaMA-Factory's `mllm_demo` with short
questions and answers, in TRL's vision format), LoRA settings, batch size and seed. Ours
processes every image once, ahead of training (its `prepare_dataset`); TRL's collator re-processes
the images at every step. Each trainer runs in its own process (peak RSS from getrusage of that
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

    if which == "ours":
        from sft_pipeline.trainer import SFTConfig, SFTTrainer
    else:
        from trl import SFTConfig, SFTTrainer
    torch.manual_seed(0)
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir, backend="pil")
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        packing=False,
        use_cpu=True,
        seed=0,
        max_length=None,
    )
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
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(
        json.dumps({"tokens": tokens[0], "seconds": seconds, "peak_rss_mib": peak})
    )


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
        for which in ("ours", "trl"):
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
            f"{which:5s} {r['tokens']:7d} tokens {r['seconds']:7.1f} s "
            f"{r['tokens_per_s']:8.1f} tokens/s  peak RSS {r['peak_rss_mib']:.0f} MiB"
        )
    ratio = results["ours"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    print(f"ours / TRL tokens/s: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({**results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
