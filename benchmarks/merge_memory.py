"""Peak memory of merging a LoRA adapter: our tensor-streamed merge vs PEFT's `merge_and_unload`.

Writes (once, in a temporary folder unless `--work` is given) a random Llama of about 0.7B
parameters in bf16, twice: in ~400 MB safetensors shards and as one `model.safetensors`, and a
rank-16 LoRA on all linear layers. Each merge then runs in its own subprocess so that its peak
RSS (VmHWM) is its own:

    ours   ShardwiseMerge(base, adapter).save_pretrained(out)         one tensor at a time
    peft   from_pretrained(base, bf16) + PeftModel + merge_and_unload  the whole model

The table compares the peaks with the checkpoint size against the target
ours <= 1 GiB + 0.5 x checkpoint in both layouts, and checks that our merged weights equal
base + scale * B @ A (fp32, rounded once to bf16) on a sample of tensors.

    .venv/bin/python benchmarks/merge_memory.py [--work DIR] [--hidden 1536 --layers 16] [--peft]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1024**3
SHARD_BYTES = 400 * 10**6


def build(work: Path, hidden: int, layers: int) -> tuple[dict[str, Path], Path]:
    from tests.export.checkpoints import write_lora_adapter, write_random_llama

    bases = {"shards": work / "base-shards", "one file": work / "base-single"}
    for layout, folder in bases.items():
        if not (folder / "config.json").is_file():
            shard = SHARD_BYTES if layout == "shards" else None
            write_random_llama(folder, hidden=hidden, layers=layers, shard_bytes=shard)
    adapter = work / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        write_lora_adapter(adapter, bases["shards"])
    return bases, adapter


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


def check_weights(base: Path, adapter: Path, merged: Path) -> bool:
    import torch
    from safetensors import safe_open

    from tests.export.checkpoints import expected_merge

    index = merged / "model.safetensors.index.json"
    where = (
        json.loads(index.read_text())["weight_map"]
        if index.is_file()
        else dict.fromkeys(["*"], "model.safetensors")
    )
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.embed_tokens.weight",
    ]
    for name in names:
        with safe_open(str(merged / where.get(name, where.get("*"))), framework="pt") as f:
            if not torch.equal(f.get_tensor(name), expected_merge(base, adapter, name)):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--peft", action="store_true", help="also measure PEFT's merge")
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="merge-memory-"))
    bases, adapter = build(work, args.hidden, args.layers)
    print("| layout | merge | checkpoint GiB | shards | peak RSS GiB | target GiB | seconds | ok |")
    print("|---|---|---|---|---|---|---|---|")
    verdicts = []
    for layout, base in bases.items():
        checkpoint = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        shards = len(list(base.glob("*.safetensors")))
        target = GIB + 0.5 * checkpoint
        for which in ("ours", "peft") if args.peft else ("ours",):
            out = work / f"merged-{which}-{base.name}"
            row = measure(which, base, adapter, out)
            ok = row["peak_rss"] <= target
            if which == "ours":
                ok = ok and check_weights(base, adapter, out)
                verdicts.append(ok)
            print(
                f"| {layout} | {which} | {checkpoint / GIB:.2f} | {shards} | "
                f"{row['peak_rss'] / GIB:.2f} | {target / GIB:.2f} | {row['seconds']:.1f} | "
                f"{'yes' if ok else 'NO'} |"
            )
    print(f"\nours {'meets' if all(verdicts) else 'MISSES'} the target in every layout")


if __name__ == "__main__":
    main()
