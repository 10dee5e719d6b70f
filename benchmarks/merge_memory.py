"""Peak memory of merging a LoRA adapter: our shard-wise merge vs PEFT's `merge_and_unload`.

Builds (once, in a temporary folder unless `--work` is given) a random Llama of about 0.5B
parameters in bf16, saved in 200 MB safetensors shards, and a rank-16 LoRA on all linear layers.
Each merge then runs in its own subprocess so that its peak RSS (VmHWM) is its own:

    ours   ShardwiseMerge(base, adapter).save_pretrained(out)         one shard at a time
    peft   from_pretrained(base, bf16) + PeftModel + merge_and_unload  the whole model

and the table compares both peaks with the checkpoint size against the target
ours <= 1 GiB + 0.5 x checkpoint.

    .venv/bin/python benchmarks/merge_memory.py [--work DIR] [--hidden 1536 --layers 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3


def build(work: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapter = work / "base", work / "adapter"
    if (base / "config.json").is_file() and (adapter / "adapter_config.json").is_file():
        return base, adapter
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    print(f"random Llama: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    model.save_pretrained(base, max_shard_size="200MB")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(adapter)
    return base, adapter


def merge_ours(base: str, adapter: str, out: str) -> None:
    from sft_pipeline.export.shard_merge import ShardwiseMerge

    ShardwiseMerge(Path(base), Path(adapter)).save_pretrained(out)


def merge_peft(base: str, adapter: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)


def _peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM of its own address space.

    Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries the parent's peak across fork + exec
    into it, so a child started by a parent that built a 3 GiB model reports at least 3 GiB.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(which: str, base: str, adapter: str, out: str) -> None:
    start = time.perf_counter()
    {"ours": merge_ours, "peft": merge_peft}[which](base, adapter, out)
    peak = _peak_rss()
    print(json.dumps({"peak_rss": peak, "seconds": time.perf_counter() - start}))


def measure(which: str, base: Path, adapter: Path, out: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", which, str(base), str(adapter), str(out)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="merge-memory-"))
    base, adapter = build(work, args.hidden, args.layers)
    checkpoint = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    shards = len(list(base.glob("*.safetensors")))
    rows = {
        which: measure(which, base, adapter, work / f"merged-{which}") for which in ("ours", "peft")
    }
    target = GIB + 0.5 * checkpoint
    print(
        f"\ncheckpoint: {checkpoint / GIB:.2f} GiB in {shards} shards (bf16); target for ours "
        f"<= 1 GiB + 0.5 x checkpoint = {target / GIB:.2f} GiB\n"
    )
    print("| merge | peak RSS GiB | x checkpoint | seconds |")
    print("|---|---|---|---|")
    for which, row in rows.items():
        print(
            f"| {which} | {row['peak_rss'] / GIB:.2f} | {row['peak_rss'] / checkpoint:.2f} | "
            f"{row['seconds']:.1f} |"
        )
    verdict = "meets" if rows["ours"]["peak_rss"] <= target else "MISSES"
    print(f"\nours {verdict} the target")


if __name__ == "__main__":
    main()
